"""A pretrained base brings its tokenizer: ``data.tokenizer: auto`` (the default) is the tokenizer of
``model.pretrained`` / ``model.upscale.base_checkpoint`` (a Hugging Face directory or a kit ``.ckpt``),
and a new ``bpe``/``char`` tokenizer on a pretrained model is refused with one ``error:`` line.

The runs are the tiny ones of tests/test_checkpoint_standalone.py (its YAML sets no data.tokenizer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from midus.checkpoint.kit import MODEL_CONFIG_KEY, checkpoint_tokenizer, read_kit_checkpoint
from midus.data.datamodule import EmbeddedCorpusConfig, LanguageModelingData
from midus.model import MidusLM, ModelConfig
from tests.hf_standins import BOS, llama3_standin
from tests.test_checkpoint_standalone import error_line, run, run_dir, write_config, write_corpus


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama3_standin(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    root = tmp_path_factory.mktemp("base_tokenizer")
    return write_config(root / "tiny.yaml", write_corpus(root), tiny_cache, steps=2)


@pytest.mark.slow
def test_fit_on_a_hf_base_takes_its_tokenizer(standin: Path, config: Path, tmp_path: Path) -> None:
    cli = run("fit", config, tmp_path / "runs", "--model.pretrained", str(standin))  # no tokenizer flags
    base = AutoTokenizer.from_pretrained(standin)
    data = cli.datamodule
    assert data.tokenizer.get_vocab() == base.get_vocab() and len(data.tokenizer) == 300  # not a new BPE
    assert data.tokenizer.backend_tokenizer.to_str() == base.backend_tokenizer.to_str()
    # Its framing too: Llama-3's BOS starts the packed documents.
    assert (torch.stack([block["input_ids"] for block in data.train_blocks]) == base.convert_tokens_to_ids(BOS)).any()
    assert cli.trainer.global_step == 2
    # The checkpoint carries it; config.yaml keeps `auto` (resolved again by each run) and hparams the resolution.
    stored = checkpoint_tokenizer(read_kit_checkpoint(run_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt"))
    assert stored.get_vocab() == base.get_vocab()
    saved = yaml.safe_load((run_dir(tmp_path / "runs") / "config.yaml").read_text())
    assert (saved["data"]["tokenizer"], saved["data"]["tokenizer_path"]) == ("auto", "")
    assert (data.hparams.tokenizer, data.hparams.tokenizer_path) == ("hf", str(standin))


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("field", ["model.pretrained", "model.upscale.base_checkpoint"])
def test_a_new_tokenizer_on_a_hf_base_is_refused(
    standin: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, field: str
) -> None:
    start = ["--model.pretrained", str(standin)] if field == "model.pretrained" else [
        "--model.upscale.base_checkpoint", str(standin), "--model.upscale.method", "dus_interleave",
        "--model.upscale.every", "1",
    ]
    with pytest.raises(SystemExit) as failure:
        run("fit", config, tmp_path / "runs", *start, "--data.tokenizer", kind)
    assert failure.value.code == 2
    assert error_line(capsys).startswith(
        f"error: data.tokenizer={kind} trains a new tokenizer, but {field}={str(standin)!r} is a pretrained model"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_kit_checkpoint_base_brings_its_tokenizer(
    config: Path, tmp_path: Path, tiny_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    run("fit", config, tmp_path / "base")  # from scratch: auto is a BPE of the run's text
    base = run_dir(tmp_path / "base") / "checkpoints" / "last.ckpt"
    stored = checkpoint_tokenizer(read_kit_checkpoint(base))
    upscale = [
        "--model.upscale.base_checkpoint", str(base), "--model.upscale.method", "dus_interleave",
        "--model.upscale.every", "1",
    ]
    cli = run("fit", config, tmp_path / "upscaled", *upscale)
    assert cli.datamodule.tokenizer.get_vocab() == stored.get_vocab()
    assert (cli.datamodule.hparams.tokenizer, cli.datamodule.hparams.tokenizer_path) == ("hf", str(base))
    # bpe with the base's own text and settings trains the base's BPE again: allowed.
    run("fit", config, tmp_path / "again", *upscale, "--data.tokenizer", "bpe")
    # Any other BPE is not the base's: refused before anything is written.
    with pytest.raises(SystemExit) as failure:
        run("fit", config, tmp_path / "other", *upscale, "--data.tokenizer", "bpe", "--data.bpe_vocab_size", "280")
    assert failure.value.code == 2
    assert error_line(capsys).startswith(
        f"error: data.tokenizer=bpe trained a tokenizer other than the one model.upscale.base_checkpoint={str(base)!r}"
    )
    assert not (tmp_path / "other").exists()


def test_auto_on_a_base_without_a_tokenizer_asks_for_one(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A kit checkpoint written before checkpoints stored the tokenizer (as tests/test_cli.py's tiny_base).
    model_config = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    state = {f"model.{name}": value for name, value in MidusLM(model_config).state_dict().items()}
    base = tmp_path / "old.ckpt"
    torch.save({MODEL_CONFIG_KEY: dataclasses.asdict(model_config), "state_dict": state}, base)
    with pytest.raises(SystemExit) as failure:
        run("fit", config, tmp_path / "runs", "--model.upscale.base_checkpoint", str(base))
    assert failure.value.code == 2
    assert error_line(capsys).startswith(
        f"error: data.tokenizer=auto takes the tokenizer of model.upscale.base_checkpoint={str(base)!r}, "
        "which carries none"
    )
    assert not (tmp_path / "runs").exists()


def test_auto_without_a_starting_model_is_todays_bpe(tiny_data, tiny_cache: Path, standin: Path) -> None:
    # TextData alone knows no model: auto is a BPE of the text (the tiny_data fixture's, asked as bpe) ...
    settings = dict(
        embedded=EmbeddedCorpusConfig(seed=0, num_people=30, docs_per_person=4), bpe_vocab_size=300, block_size=32,
        batch_size=8, cache_dir=str(tiny_cache),
    )
    assert tiny_data.settings["tokenizer"] == "auto"  # the fixture sets none: the default
    assert LanguageModelingData(tokenizer="bpe", **settings).tokenizer.get_vocab() == tiny_data.tokenizer.get_vocab()
    # ... or the tokenizer data.tokenizer_path names.
    named = LanguageModelingData(tokenizer_path=str(standin), **settings)
    assert named.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(standin).get_vocab()
