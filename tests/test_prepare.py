"""``data.format: shards`` and ``python -m midus prepare``: the same blocks as packing, text
streamed from files and hub datasets, one preparation read by later runs, and bad input refused
before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from midus.cli import USER_ERROR_EXIT, main
from midus.data.datamodule import EmbeddedCorpusConfig, FilesConfig, HubConfig, LanguageModelingData, ShardsConfig
from midus.data.prepare_command import prepare
from midus.data.token_shard_encoding import held_out
from midus.data.token_shards import MANIFEST
from tests.hf_standins import STANDIN_TEXT, bos_tokenizer, llama3_standin

TINY = dict(embedded=EmbeddedCorpusConfig(seed=0, num_people=30, docs_per_person=4), bpe_vocab_size=300, block_size=32)


def test_shards_give_the_packed_blocks_of_the_embedded_corpus(tiny_cache: Path, tiny_data, tmp_path: Path) -> None:
    data = LanguageModelingData(**TINY, cache_dir=str(tiny_cache), format="shards", shards=ShardsConfig(num_proc=2))
    assert data.tokenizer.get_vocab() == tiny_data.tokenizer.get_vocab()  # the BPE cached by the packed run
    for ours, packed in ((data.train_blocks, tiny_data.train_blocks), (data.val_blocks, tiny_data.val_blocks)):
        assert torch.equal(ours[:]["input_ids"], packed[:]["input_ids"])
    assert data.prepared_dir == tiny_cache / "shards" / "biographies-s0-n30-d4-bpe300"
    # Another block size reads the same shards: nothing is prepared again.
    stamp = (data.prepared_dir / MANIFEST).stat().st_mtime_ns
    wider = LanguageModelingData(**{**TINY, "block_size": 64}, cache_dir=str(tiny_cache), format="shards")
    assert (wider.prepared_dir / MANIFEST).stat().st_mtime_ns == stamp
    assert wider.train_blocks[0]["input_ids"].tolist() == data.train_blocks[:2]["input_ids"].flatten()[:65].tolist()


def test_files_with_a_bos_tokenizer_give_the_packed_blocks(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("\n\n".join(STANDIN_TEXT[:150]))
    (tmp_path / "valid.txt").write_text("\n\n".join(STANDIN_TEXT[150:]))
    bos_tokenizer(STANDIN_TEXT).save_pretrained(str(tmp_path / "tok"))
    files = FilesConfig(train=[str(tmp_path / "train.txt")], val=[str(tmp_path / "valid.txt")])
    options = dict(source="files", files=files, tokenizer="hf", tokenizer_path=str(tmp_path / "tok"), block_size=24,
                   cache_dir=str(tmp_path / "c"))
    packed = LanguageModelingData(**options)
    shards = LanguageModelingData(**options, format="shards", shards=ShardsConfig(num_proc=1))
    assert torch.equal(shards.train_blocks[:]["input_ids"], packed.train_blocks[:]["input_ids"])
    assert torch.equal(shards.val_blocks[:]["input_ids"], packed.val_blocks[:]["input_ids"])
    # The same corpus key and tokenizer fingerprint as the packed cache: <key>-hf-<fingerprint>.
    packed_name = shards.prepared_dir.name.replace("-hf-", "-") + "-block24-training"
    assert (tmp_path / "c" / "blocks" / packed_name).is_dir()


def test_a_hub_dataset_is_streamed_and_a_prepared_one_is_not_read_again(tmp_path: Path) -> None:
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    records = [{"body": f"record {index} says the {STANDIN_TEXT[index]}"} for index in range(120)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    options = dict(source="hub", hub=HubConfig(dataset=str(folder), text_field="body", val_fraction=0.1),
                   tokenizer="char", block_size=16, cache_dir=str(tmp_path / "cache"), format="shards",
                   shards=ShardsConfig(num_proc=1))
    data = LanguageModelingData(**options)
    # No validation split: every record that raises ceil(records * 0.1) is held out, the first included.
    held = [record["body"] for index, record in enumerate(records) if held_out(index, 0.1)]
    assert len(held) == 12 and held[0].startswith(data.tokenizer.decode(data.val_blocks[0]["input_ids"]))
    assert not (tmp_path / "cache" / "hf_datasets").exists()  # streamed: no Arrow copy of the text
    shutil.rmtree(folder)  # prepared: the dataset is not opened again
    again = LanguageModelingData(**options)
    assert torch.equal(again.train_blocks[:]["input_ids"], data.train_blocks[:]["input_ids"])


def test_a_token_budget_is_part_of_the_directory(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("\n\n".join(STANDIN_TEXT))
    options = dict(source="files", files=FilesConfig(train=[str(tmp_path / "train.txt")]), tokenizer="char",
                   block_size=16, cache_dir=str(tmp_path / "cache"), format="shards")
    whole = LanguageModelingData(**options, shards=ShardsConfig(num_proc=1))
    budget = LanguageModelingData(**options, shards=ShardsConfig(num_proc=1, max_tokens=1000))
    assert budget.train_blocks.tokens == 1000 and budget.prepared_dir.name == whole.prepared_dir.name + "-max1000"
    # The budget's char tokenizer learnt from the first 4 x 1000 characters: other ids, the same text.
    text = whole.tokenizer.decode(whole.train_blocks[: len(budget.train_blocks)]["input_ids"].flatten())
    assert budget.tokenizer.decode(budget.train_blocks[:]["input_ids"].flatten()) == text


def write_config(tmp_path: Path, data: dict, **sections) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"seed_everything": 0, "data": data, **sections}))
    return path


def test_prepare_writes_what_the_same_config_then_reads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "train.txt").write_text("\n\n".join(STANDIN_TEXT))
    config = write_config(tmp_path, {
        "source": "files", "files": {"train": [str(tmp_path / "train.txt")]}, "tokenizer": "bpe", "bpe_vocab_size": 300,
        "block_size": 16, "cache_dir": str(tmp_path / "cache"), "format": "shards",
    })
    main(["prepare", "--config", str(config), "--data.shards.num_proc", "2"])
    printed = capsys.readouterr().out
    assert "prepared " in printed and "shards of uint16" in printed and "2.00 bytes a token" in printed
    (directory,) = (path for path in (tmp_path / "cache" / "shards").iterdir() if path.is_dir())
    stamp = (directory / MANIFEST).stat().st_mtime_ns
    data = prepare(["--config", str(config)])  # what fit builds from the same data: section
    assert data.prepared_dir == directory and (directory / MANIFEST).stat().st_mtime_ns == stamp
    assert len(data.train_blocks) > 100


def test_prepare_takes_the_tokenizer_of_the_starting_model(tmp_path: Path) -> None:
    base = llama3_standin(tmp_path / "base")
    (tmp_path / "train.txt").write_text("\n\n".join(STANDIN_TEXT))
    config = write_config(
        tmp_path,
        {"source": "files", "files": {"train": [str(tmp_path / "train.txt")]}, "block_size": 16,
         "cache_dir": str(tmp_path / "cache"), "format": "shards", "shards": {"num_proc": 1}},
        model={"pretrained": str(base)},
    )
    data = prepare(["--config", str(config)])
    assert data.prepared_dir.name.split("-")[-2] == "hf" and data.vocab_size == 300
    assert int(data.train_blocks[0]["input_ids"][0]) == data.tokenizer.bos_token_id  # framed as the base frames


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data.format", "blocks"], "error: data.format=blocks: prepare writes token shards"),
        (["--data.shards.max_tokens", "-1"], "error: data.shards.max_tokens must be >= 0"),
        (["--data.shards.tokens_per_shard", "0"], "error: data.shards.tokens_per_shard must be >= 1"),
        (["--data.files.text_field", "body"],
         "error: data.files.text_field='body' is not a column of data.files.train"),
        (["--data.files.train", "[nope.txt]"], "error: data.files.train: 'nope.txt' does not exist"),
    ],
)
def test_bad_input_is_one_error_line_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    (tmp_path / "train.txt").write_text("\n\n".join(STANDIN_TEXT))
    config = write_config(tmp_path, {"source": "files", "files": {"train": [str(tmp_path / "train.txt")]},
                                     "tokenizer": "hf", "tokenizer_path": str(tmp_path / "tok"),
                                     "cache_dir": str(tmp_path / "cache"), "format": "shards"})
    bos_tokenizer(STANDIN_TEXT).save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(SystemExit) as stopped:
        main(["prepare", "--config", str(config), *flags])
    assert stopped.value.code == USER_ERROR_EXIT
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
    assert not list((tmp_path / "cache").glob("shards/*/*.bin"))


def test_shard_settings_without_the_shards_format_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.shards.max_tokens=10 applies to token shards; set data.format: shards"):
        LanguageModelingData(**TINY, cache_dir=str(tmp_path), shards=ShardsConfig(max_tokens=10))
    assert not list(tmp_path.iterdir())


def test_a_prepared_dir_of_another_tokenizer_is_refused(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("\n\n".join(STANDIN_TEXT))
    options = dict(source="files", files=FilesConfig(train=[str(tmp_path / "train.txt")]), block_size=16,
                   format="shards", cache_dir=str(tmp_path / "cache"),
                   shards=ShardsConfig(directory=str(tmp_path / "prepared"), num_proc=1))
    LanguageModelingData(**options, tokenizer="char")
    with pytest.raises(ValueError, match=r"data.shards.directory: .* holds token shards prepared with other settings "
                                         r"\(tokenizer: 'char' there, 'bpe300' now\)"):
        LanguageModelingData(**options, tokenizer="bpe", bpe_vocab_size=300)


def test_an_ablation_whose_arms_change_data_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "ablation.yaml"
    config.write_text(yaml.safe_dump({
        "ablation": {"name": "x", "arms": {"a": {"data.block_size": 64}, "b": {"model.optimizer.learning_rate": 0.1}}},
        "data": {"format": "shards"},
    }))
    with pytest.raises(ValueError, match=r"arms \['a'\] change data\.\*; prepare reads one data: section"):
        prepare(["--config", str(config)])
