"""`PeriodicCheckpoint`: a checkpoint every N training steps, the newest few kept, so a
preempted run loses at most N steps (resume with ``fit --ckpt_path <dir>/step-<S>.ckpt``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from midus.training.lightning_internals import save_after_validation, save_now, skips_saving, validation_follows


class PeriodicCheckpoint(ModelCheckpoint):
    """Save ``step-<S>.ckpt`` every `every_n_train_steps` optimizer steps and keep the newest `keep`.

    A step that is also a validation step is saved after its validation, not before: Lightning
    resumes a checkpoint written at the end of a training batch as if that batch's validation
    had already run, so saving before it would drop the validation from the resumed run (its
    curve point, its best-checkpoint candidate). It runs after every other callback, so the
    state it saves includes what they did with that validation.

    Args:
        every_n_train_steps: steps between checkpoints (the most a preempted run loses).
        keep: how many of the newest periodic checkpoints stay on disk (-1: all).
        dirpath: where they go (default: the run's ``checkpoints/`` directory).
    """

    def __init__(self, every_n_train_steps: int = 100, keep: int = 2, dirpath: str | None = None) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"PeriodicCheckpoint.every_n_train_steps must be >= 1, got {every_n_train_steps}")
        if keep == 0 or keep < -1:
            raise ValueError(f"PeriodicCheckpoint.keep must be >= 1, or -1 for all, got {keep}")
        self.every_n_train_steps = every_n_train_steps
        # "Newest" is the highest step: monitor the step counter Lightning offers every checkpoint.
        super().__init__(
            dirpath=dirpath, filename="step-{step}", auto_insert_metric_name=False,
            every_n_train_steps=every_n_train_steps, save_top_k=keep, monitor="step", mode="max",
            enable_version_counter=False,  # a resume that reaches the same step again overwrites its file
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Last of all callbacks: at a validation end the others (best checkpoint, summary) update
        # their state first, and this checkpoint carries it.
        trainer.callbacks.remove(self)
        trainer.callbacks.append(self)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Replaces ModelCheckpoint's own step logic, which also defers an epoch's last batch to a
        # validation it assumes follows (none does with check_val_every_n_epoch: null).
        if trainer.global_step % self.every_n_train_steps or skips_saving(self, trainer):
            return
        if validation_follows(trainer):
            save_after_validation(self)  # ModelCheckpoint saves it at on_validation_end
            return
        save_now(self, trainer)
