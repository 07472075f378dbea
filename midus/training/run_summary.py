"""`RunSummary`: the callback that writes a fit's ``summary.json`` (format: `midus.run_files`).

The CLI adds it to every ``fit``. At the end of training it writes
``<trainer.log_dir>/summary.json`` (``runs/<experiment>/<version>/summary.json``): at
``on_train_end``, while the model and the optimizer state are still where they trained (Lightning's
teardown, before ``on_fit_end``, moves a CUDA model to the CPU, where peak memory and latency
would be the CPU's); a fit that trained no step (resumed from its final checkpoint) writes it at
``on_fit_end``, with the metrics of the last validation before that checkpoint: they are
callback state in every checkpoint, since a resumed fit with no step left validates nothing.

A run resumed with ``--ckpt_path`` reports the whole run, not only the process that finished
it: batches and tokens are `CausalLM`'s own checkpointed counters, and this callback's
training time, wall time and best validation loss are callback state in every checkpoint. In
a multi-process run the tokens are world_size times one process's, the time that of process 0.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy

from midus.run_files import RUNS_AT_A_TIME_ENV, SUMMARY_FILE, SUMMARY_SCHEMA_VERSION, SUMMARY_VAL_METRICS
from midus.training.lightning_internals import put_callback_metrics
from midus.training.memory_health import memory_engaged, memory_usage, memory_zeroed_delta


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
        self._best_val_loss: float | None = None
        self._memory_engaged_step: int | None = None
        self._earlier_wall_s = 0.0  # wall time of the processes before a resume
        # Token-weighted training loss and tokens since the last validation, this process's batches
        # (a tensor: no sync per step); summed over the processes at the validation.
        self._interval_loss: torch.Tensor | float = 0.0
        self._interval_tokens = 0
        self._train_loss: float | None = None  # its mean over the last completed validation interval
        self._written = False  # this fit's summary.json is written (on_train_end, else on_fit_end)
        self._last_validation: dict[str, float] = {}  # callback_metrics after the last validation

    def state_dict(self) -> dict[str, Any]:
        return {
            "train_seconds": self._train_seconds, "best_val_loss": self._best_val_loss,
            "memory_engaged_step": self._memory_engaged_step,
            "wall_time_s": self._earlier_wall_s + time.perf_counter() - self._fit_started_at,
            "train_loss": self._train_loss, "last_validation": self._last_validation,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_seconds = state_dict["train_seconds"]
        self._best_val_loss = state_dict["best_val_loss"]
        self._memory_engaged_step = state_dict.get("memory_engaged_step")  # absent before it existed
        self._earlier_wall_s = state_dict["wall_time_s"]
        self._train_loss = state_dict.get("train_loss")  # absent before it existed
        self._last_validation = state_dict.get("last_validation", {})  # absent before it existed

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._fit_started_at = time.perf_counter()
        self._written = False

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
        # CausalLM's training_step returns the loss summed over its tokens beside "loss" (which
        # Lightning has divided by accumulate_grad_batches by now).
        if isinstance(outputs, dict) and "loss_sum" in outputs:
            self._interval_loss = self._interval_loss + outputs["loss_sum"].detach().double()
            self._interval_tokens += int(outputs["tokens"])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return  # the sanity pass is never logged as val/loss and would not be comparable
        # Every process reaches this hook: sum the interval over them (mean per-token loss of the run).
        loss_sum, tokens = float(self._interval_loss), float(self._interval_tokens)
        if trainer.world_size > 1:
            interval = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=pl_module.device)
            loss_sum, tokens = trainer.strategy.reduce(interval, reduce_op="sum").tolist()
        if tokens:
            self._train_loss = loss_sum / tokens
            self._interval_loss, self._interval_tokens = 0.0, 0
        loss = _metric(trainer, "val/loss")
        if loss is not None and (self._best_val_loss is None or loss < self._best_val_loss):
            self._best_val_loss = loss
        if self._memory_engaged_step is None and memory_engaged(trainer):
            self._memory_engaged_step = trainer.global_step
        self._last_validation = {
            name: float(value) for name, value in trainer.callback_metrics.items()
            if isinstance(value, torch.Tensor) and value.numel() == 1
        }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._written:  # training ran no loop (nothing left to train): Lightning skips on_train_end
            step0 = getattr(pl_module, "step0_metrics", {})
            if _metric(trainer, "val/loss") is None:
                if trainer.global_step == 0 and step0:
                    # trainer.max_steps: 0, the model as it starts (an ablation's un-continued base): its
                    # validation is the full sanity pass, which Lightning keeps out of callback_metrics.
                    put_callback_metrics(trainer, step0)
                    self._best_val_loss = step0.get("val/loss")
                elif trainer.global_step > 0:
                    # Resumed from its final checkpoint: the run's last validation, as the checkpoint carried it.
                    put_callback_metrics(trainer, self._last_validation)
            self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A collective call first, on every process: the run directory (the logger broadcasts it
        # from process 0); only then does process 0 alone write.
        run_dir = trainer.log_dir or trainer.default_root_dir
        self._written = True
        if not trainer.is_global_zero:
            return
        record = self.summary(trainer, pl_module, str(run_dir))
        directory = Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SUMMARY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def summary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, run_dir: str | None = None
    ) -> dict[str, Any]:
        """The record written to ``summary.json``; `run_dir`: the run directory (default: the
        trainer's, which is a collective call in a multi-process run)."""
        model = pl_module.model
        # The module counts batches and tokens (checkpointed with it); every process trains on
        # batches of one size, so the run's tokens are world_size times this process's.
        batches, all_tokens = pl_module.batches_seen, pl_module.tokens_seen * trainer.world_size
        tokens_per_batch = round(pl_module.tokens_seen / batches) if batches else 0
        val = {name.removeprefix("val/"): _metric(trainer, name) for name in SUMMARY_VAL_METRICS}
        val["best_loss"] = self._best_val_loss
        seconds = self._train_seconds
        return {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "run_dir": run_dir or str(trainer.log_dir or trainer.default_root_dir),
            "config_paths": self.config_paths,
            "device": str(pl_module.device),
            "params": {
                "total": model.num_parameters(),
                "trainable": model.num_parameters(trainable_only=True),
                "memory": model.num_memory_parameters(),
                "added": getattr(pl_module, "added_parameters", 0),
            },
            "val": val,
            "memory_zeroed_delta": memory_zeroed_delta(trainer),
            "memory_usage": memory_usage(trainer, model),
            "memory_engaged_step": self._memory_engaged_step,
            "knowledge_bits": knowledge_bits_record(
                trainer, model.num_parameters(), getattr(pl_module, "added_parameters", 0)
            ),
            "train": {
                # Mean per-token training loss over the batches between the last two validations (all
                # processes, any accumulation): beside val.loss, the train/validation gap.
                "loss": self._train_loss,
                "steps": trainer.global_step,
                "batches": batches,
                "tokens": all_tokens,
                "tokens_per_sec": all_tokens / seconds if seconds > 0 else None,
                "mean_step_time_s": seconds / batches if batches else None,
                # One optimizer step: micro-batch x accumulation x processes (compare arms run on
                # different device counts by this, not by data.batch_size).
                "processes": trainer.world_size,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "global_batch_tokens": tokens_per_batch * trainer.accumulate_grad_batches * trainer.world_size,
            },
            "wall_time_s": self._earlier_wall_s + time.perf_counter() - self._fit_started_at,
            "peak_memory": peak_memory(pl_module.device),
            "optimizer_state": optimizer_state(trainer.optimizers),
            "timing": timing_conditions(),
            # Under FSDP the weights outside a forward are shards: generate would fail (null = not measured).
            "latency": None if isinstance(trainer.strategy, FSDPStrategy)
            else generation_latency(model, self.latency_prompt_tokens, self.latency_new_tokens),
        }


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this run on `device`: ``{"bytes": int, "kind": "cuda_max_allocated" | "cpu_max_rss"}``."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "kind": "cuda_max_allocated"}
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return {"bytes": max_rss if sys.platform == "darwin" else max_rss * 1024, "kind": "cpu_max_rss"}


def optimizer_state(optimizers: list[torch.optim.Optimizer]) -> dict[str, int] | None:
    """Bytes and number of the tensors in `optimizers`' state (AdamW: moments and step counters);
    a DTensor counts its local shard. None without an optimizer."""
    if not optimizers:
        return None
    total, count = 0, 0
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    local = value.to_local() if hasattr(value, "to_local") else value
                    total += local.numel() * local.element_size()
                    count += 1
    return {"bytes": total, "tensors": count}


def timing_conditions() -> dict[str, int | None]:
    """What this process's times were measured under: the ablation runner's runs at a time (None
    outside it), torch's threads and the CPU cores this process may use."""
    at_a_time = os.environ.get(RUNS_AT_A_TIME_ENV)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "runs_at_a_time": int(at_a_time) if at_a_time and at_a_time.isdigit() else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_cores": cores,
    }


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


def knowledge_bits_record(trainer: pl.Trainer, total_parameters: int, added_parameters: int) -> dict[str, Any] | None:
    """The final validation's ``val/knowledge_bits[_replay]`` (`midus.probes.knowledge_bits`) with bits per
    parameter and all bits per added parameter (null without up-scaling; the ablation table's
    bits-above-control columns subtract a control run's bits first); None when never measured."""
    bits = _metric(trainer, "val/knowledge_bits")
    if bits is None:
        return None
    return {
        "bits": bits, "bits_replay": _metric(trainer, "val/knowledge_bits_replay"),
        "bits_per_param": bits / total_parameters,
        "bits_per_added_param": bits / added_parameters if added_parameters else None,
    }


def _metric(trainer: pl.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    if value is None:
        return None
    return float(value)  # a diverged run keeps its NaN/inf (Python's json reads them back)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
