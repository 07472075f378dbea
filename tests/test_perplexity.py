"""Perplexity of a checkpoint on any text: ``validate`` with a data override and the
checkpoint's own tokenizer (which every checkpoint of ``fit`` stores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from midus.checkpoint.kit import checkpoint_tokenizer, model_from_checkpoint, read_kit_checkpoint
from midus.cli import main
from midus.data.corpus import BiographyCorpus
from midus.data.datamodule import FilesConfig, LanguageModelingData


@pytest.fixture(scope="module")
def other_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Biographies of people the model never saw (another population seed), one per paragraph."""
    corpus = BiographyCorpus(seed=7, num_people=10, docs_per_person=2)
    path = tmp_path_factory.mktemp("text") / "other_people.txt"
    path.write_text("\n\n".join(corpus.train_documents()[:20]), encoding="utf-8")
    return path


def text_override(text: Path, checkpoint: Path) -> list[str]:
    """Score `text` with the checkpoint's tokenizer, logging nowhere near the training run."""
    return [
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(text.parent / "eval"),  # where validate saves its config.yaml
        "--data.source", "files",
        "--data.files.train", f"[{text}]",
        "--data.files.val", f"[{text}]",
        "--data.tokenizer", "hf",
        "--data.tokenizer_path", str(checkpoint),
    ]


@pytest.mark.slow
def test_validate_reports_perplexity_of_other_text_with_the_checkpoints_tokenizer(
    tiny_memory_run: Path, other_text: Path
) -> None:
    run_config = tiny_memory_run.parents[1] / "config.yaml"
    cli = main([
        "validate", "--config", str(run_config), "--ckpt_path", str(tiny_memory_run),
        *text_override(other_text, tiny_memory_run),
    ])
    metrics = cli.trainer.callback_metrics
    assert metrics["val/ppl"].item() == pytest.approx(math.exp(metrics["val/loss"].item()), rel=1e-5)

    # The same number computed by hand from the checkpoint file alone.
    checkpoint = read_kit_checkpoint(tiny_memory_run)
    model = model_from_checkpoint(checkpoint, tiny_memory_run).eval()
    data = LanguageModelingData(
        source="files", files=FilesConfig(train=[str(other_text)], val=[str(other_text)]), tokenizer="hf",
        tokenizer_path=str(tiny_memory_run), block_size=cli.datamodule.hparams.block_size,
        cache_dir=cli.datamodule.hparams.cache_dir,
    )
    assert data.tokenizer.get_vocab() == checkpoint_tokenizer(checkpoint).get_vocab()
    total, count = 0.0, 0
    with torch.no_grad():
        for block in data.val_blocks:
            ids = block["input_ids"][None]
            logits = model(ids[:, :-1])
            total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert metrics["val/loss"].item() == pytest.approx(total / count, rel=1e-4)
    # Unseen people's facts are unpredictable, but the template language is not: far below uniform.
    # Measured 4.09 nats against log V = 5.70; a random-init model of the same shape scores 5.72.
    assert metrics["val/loss"].item() < math.log(model.config.vocab_size) - 1.0


@pytest.mark.slow
def test_validate_refuses_a_tokenizer_other_than_the_checkpoints(
    tiny_memory_run: Path, other_text: Path, tiny_cache: Path
) -> None:
    run_config = tiny_memory_run.parents[1] / "config.yaml"
    with pytest.raises(SystemExit) as failure:
        main(
            [
                "validate",
                "--config",
                str(run_config),
                "--ckpt_path",
                str(tiny_memory_run),
                "--trainer.logger",
                "false",
                "--trainer.default_root_dir",
                str(other_text.parent / "eval"),
                "--data.source",
                "files",
                "--data.files.train",
                f"[{other_text}]",
                "--data.bpe_vocab_size",
                "300",
                "--data.cache_dir",
                str(tiny_cache),
            ]
        )
    assert failure.value.code == 2 and "data.tokenizer_path=<the .ckpt>" in str(failure.value.__context__)
