"""`RunSummary`: one ``summary.json`` per fit run, the row an ablation table is built from.

The CLI adds this callback to every ``fit``. At the end of training it writes
``<trainer.log_dir>/summary.json`` (``runs/<experiment>/<version>/summary.json``)::

    {
      "schema_version": 1,
      "run_dir": "runs/quickstart/ffn",
      "config_paths": ["experiments/quickstart.yaml"],
      "device": "cpu",
      "params": {"total": 912000, "trainable": 912000, "memory": 0, "added": 0},
      "val": {"loss": 3.49, "ppl": 32.8, "recall_acc": 0.99, "recall_acc_heldout": 0.51,
              "best_loss": 3.49},
      "train": {"steps": 500, "batches": 500, "tokens": 2032000, "tokens_per_sec": 10500.0,
                "mean_step_time_s": 0.39},
      "wall_time_s": 212.0,
      "peak_memory": {"bytes": 734003200, "kind": "cpu_max_rss"},
      "latency": {"prompt_tokens": 128, "new_tokens": 32, "prefill_ms": 4.1, "decode_ms_per_token": 1.9}
    }

* ``val.*`` are the last logged values (``None`` when never logged, e.g. the recall probe
  switched off); ``best_loss`` is the lowest ``val/loss`` of any validation after the sanity check.
* ``train.tokens_per_sec`` counts training batches only: the time from ``on_train_batch_start``
  to ``on_train_batch_end`` (forward, backward, optimizer step), summed, excluding validation,
  checkpointing and logging between batches. Tokens are the predicted positions
  (``input_ids[:, 1:]``) of the batches trained in this process; ``mean_step_time_s`` is per
  training batch; ``steps`` is the trainer's global step (optimizer steps, resumed runs included).
* ``params.added``: parameters an up-scaling added to its base (0 without one).
* ``latency``: batch-1 greedy `generate` at fit end, best of 3: the prefill of a random prompt
  and the mean time per token decoded one at a time with the KV cache.
* ``wall_time_s`` spans ``on_fit_start`` to ``on_fit_end``, validation included.
* ``peak_memory.kind`` says what ``bytes`` is: ``cuda_max_allocated``
  (`torch.cuda.max_memory_allocated` since fit start: tensors only, no allocator cache) or
  ``cpu_max_rss`` (the process's peak resident set size, since the process started, so run one
  fit per process to compare runs; the ablation runner does).

New measurements go into a new key or section (readers use ``.get``); bump
``SCHEMA_VERSION`` only when the meaning of an existing key changes.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

SCHEMA_VERSION = 1
FILENAME = "summary.json"
# The final values of these logged metrics land under "val", named without the "val/" prefix.
VAL_METRICS = (
    "val/loss", "val/ppl", "val/recall_acc", "val/recall_acc_heldout", "val/recall_acc_replay",
    "val/recall_acc_replay_heldout",
)


class RunSummary(pl.Callback):
    """Measure a fit run and write ``summary.json`` into the run directory at its end.

    Args:
        config_paths: the configuration files of the run, recorded as given (the CLI fills them in).
        latency_prompt_tokens: prompt length of the prefill-latency measurement at fit end.
        latency_new_tokens: tokens decoded one at a time (with the KV cache) for the decode latency.
    """

    def __init__(
        self, config_paths: list[str] | None = None, latency_prompt_tokens: int = 128, latency_new_tokens: int = 32
    ) -> None:
        self.config_paths = list(config_paths or [])
        self.latency_prompt_tokens = latency_prompt_tokens
        self.latency_new_tokens = latency_new_tokens
        self._fit_started_at = 0.0
        self._batch_started_at = 0.0
        self._train_seconds = 0.0
        self._train_batches = 0
        self._train_tokens = 0
        self._best_val_loss: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._fit_started_at = time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _synchronize(pl_module.device)  # CUDA runs ahead of Python: time finished work only
        self._batch_started_at = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        _synchronize(pl_module.device)
        self._train_seconds += time.perf_counter() - self._batch_started_at
        self._train_batches += 1
        self._train_tokens += batch["input_ids"][:, 1:].numel()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return  # the sanity pass is never logged as val/loss and would not be comparable
        loss = _metric(trainer, "val/loss")
        if loss is not None and (self._best_val_loss is None or loss < self._best_val_loss):
            self._best_val_loss = loss

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        record = self.summary(trainer, pl_module)
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FILENAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The record written to ``summary.json`` (see the module docstring for its keys)."""
        model = pl_module.model
        val = {name.removeprefix("val/"): _metric(trainer, name) for name in VAL_METRICS}
        val["best_loss"] = self._best_val_loss
        seconds = self._train_seconds
        return {
            "schema_version": SCHEMA_VERSION,
            "run_dir": str(trainer.log_dir or trainer.default_root_dir),
            "config_paths": self.config_paths,
            "device": str(pl_module.device),
            "params": {
                "total": model.num_parameters(),
                "trainable": model.num_parameters(trainable_only=True),
                "memory": model.num_memory_parameters(),
                "added": getattr(pl_module, "added_parameters", 0),
            },
            "val": val,
            "train": {
                "steps": trainer.global_step,
                "batches": self._train_batches,
                "tokens": self._train_tokens,
                "tokens_per_sec": self._train_tokens / seconds if seconds > 0 else None,
                "mean_step_time_s": seconds / self._train_batches if self._train_batches else None,
            },
            "wall_time_s": time.perf_counter() - self._fit_started_at,
            "peak_memory": peak_memory(pl_module.device),
            "latency": generation_latency(model, self.latency_prompt_tokens, self.latency_new_tokens),
        }


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this run on `device`: ``{"bytes": int, "kind": "cuda_max_allocated" | "cpu_max_rss"}``."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "kind": "cuda_max_allocated"}
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return {"bytes": max_rss if sys.platform == "darwin" else max_rss * 1024, "kind": "cpu_max_rss"}


@torch.no_grad()
def generation_latency(model: torch.nn.Module, prompt_tokens: int, new_tokens: int, repeats: int = 3) -> dict[str, Any]:
    """Best-of-`repeats` batch-1 latency of the model's own `generate` (greedy, KV cache).

    Prefill = a generate of one token (the prompt's forward plus one argmax); decode per token
    = the extra time of generating 1 + `new_tokens` tokens, divided by `new_tokens`.
    """
    device = model.embed.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), device=device)

    def timed(tokens: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        model.generate(prompt, tokens)
        _synchronize(device)
        return time.perf_counter() - start

    was_training = model.training
    model.eval()
    timed(1 + new_tokens)  # warms up allocators and kernels
    prefill = min(timed(1) for _ in range(repeats))
    full = min(timed(1 + new_tokens) for _ in range(repeats))
    model.train(was_training)
    return {
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "prefill_ms": prefill * 1e3, "decode_ms_per_token": max(full - prefill, 0.0) / new_tokens * 1e3,
    }


def _metric(trainer: pl.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    if value is None:
        return None
    return float(value)  # a diverged run keeps its NaN/inf (Python's json reads them back)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
