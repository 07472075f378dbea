"""Stop a run the step its training loss stops being finite, naming the newest good checkpoint.

Training on after a NaN or infinite loss only wastes the rest of the budget: every later step
is NaN too (AdamW's moments are poisoned), and the run would end with ``val/loss: nan`` and exit
code 0, so an ablation would tabulate it as a finished arm. `check_finite_loss` raises
`NonFiniteLossError` inside the training step, before the backward pass; ``python -m midus``
turns it into one ``error:`` line and exit code `EXIT_CODE`, which the ablation runner reports
as a failed arm.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

EXIT_CODE = 3
"""Exit status of ``python -m midus`` when training diverged (2 is a user error)."""


class NonFiniteLossError(RuntimeError):
    """The training loss of a step was NaN or infinite."""


def newest_checkpoint(trainer: pl.Trainer) -> str | None:
    """The most recently written checkpoint of the run's ModelCheckpoint callbacks, if any."""
    paths = {
        Path(path)
        for callback in trainer.callbacks
        if isinstance(callback, ModelCheckpoint)
        for path in (callback.last_model_path, callback.best_model_path)
        if path
    }
    existing = [path for path in paths if path.is_file()]
    return str(max(existing, key=lambda path: path.stat().st_mtime)) if existing else None


def check_finite_loss(loss: torch.Tensor, trainer: pl.Trainer) -> None:
    """Raise `NonFiniteLossError` naming the step and the newest good checkpoint if `loss` is not finite.

    Reading the flag waits for the step's forward on an accelerator; the default progress bar
    already reads ``train/loss`` (``prog_bar=True``) after every step, so that wait is paid anyway.
    """
    # Every process decides together: one that stopped alone would leave the others waiting in
    # the next gradient all-reduce.
    non_finite = (~torch.isfinite(loss.detach())).float()
    if trainer.world_size > 1:
        non_finite = trainer.strategy.reduce(non_finite, reduce_op="sum")
    if not bool(non_finite):
        return
    checkpoint = newest_checkpoint(trainer)
    resume = f"the newest good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written before it"
    raise NonFiniteLossError(
        f"training diverged: train/loss is {float(loss.detach()):g} at step {trainer.global_step}"
        f"{'' if trainer.world_size == 1 else ' on at least one process'}; {resume} "
        "(lower model.optimizer.learning_rate or raise trainer.gradient_clip_val, then resume with --ckpt_path)"
    )
