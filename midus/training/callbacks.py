"""Callbacks the CLI adds: writing ``predict`` completions as readable text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter


class CompletionWriter(BasePredictionWriter):
    """Decode each predicted continuation, print it, and append it to ``predictions.jsonl``.

    The file lands in the run directory (the logger's log_dir) or, without a logger, in the
    working directory.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        tokenizer = trainer.datamodule.tokenizer
        directory = Path(trainer.log_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "predictions.jsonl", "a", encoding="utf-8") as out:
            for prompt_ids, new_ids in zip(batch["input_ids"].tolist(), prediction):
                record = {
                    "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True),
                    "completion": tokenizer.decode(new_ids, skip_special_tokens=True),
                }
                print(f"{record['prompt']}|{record['completion']}")
                out.write(json.dumps(record) + "\n")
