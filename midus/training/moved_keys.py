"""The table of configuration keys that moved: one ``error:`` line naming the new place when a user
gives one, and the new place when the kit reads a file it wrote before the move.

Checked (`check_moved_keys`, before anything is parsed or written) in the command line
(``--model.learning_rate 0.001``), in every ``--config`` YAML given there, an ablation's arms and
tuning candidates included. Upgraded (`upgrade_config`) where the kit reads its own earlier
files: a checkpoint's hyperparameters (``--ckpt_path``, `midus.training.cli`) and an ablation
arm's recorded config (`midus.ablation.resume`). The mechanism and the data keys are
`midus.data.moved_keys` (the analyses and ``prepare`` read data sections alone).
"""

from __future__ import annotations

from typing import Any

from midus.data import moved_keys as data_keys
from midus.data.moved_keys import MOVED_DATA_KEYS

MOVED_MODEL_KEYS: dict[str, str] = {
    # Issue 21: the validation probes' settings in model.probes.
    "model.recall_probe_size": "model.probes.recall_questions",
    "model.knowledge_bits_people": "model.probes.knowledge_bits_people",
    "model.memory_zeroed_eval": "model.probes.memory_zeroed",
    # Issue 28: CausalLM's knobs in groups (midus.training.config).
    "model.learning_rate": "model.optimizer.learning_rate",
    "model.weight_decay": "model.optimizer.weight_decay",
    "model.betas": "model.optimizer.betas",
    "model.fused_adamw": "model.optimizer.fused",
    "model.warmup_steps": "model.schedule.warmup_steps",
    "model.min_lr_ratio": "model.schedule.min_lr_ratio",
    "model.memory_lr": "model.memory_optimizer.learning_rate",
    "model.memory_lr_keys": "model.memory_optimizer.subkeys",
    "model.memory_lr_schedule": "model.memory_optimizer.schedule",
    "model.compile": "model.compute.compile",
    "model.activation_checkpointing": "model.compute.activation_checkpointing",
    "model.loss_chunk_tokens": "model.compute.loss_chunk_tokens",
    "model.max_new_tokens": "model.generation.max_new_tokens",
    "model.temperature": "model.generation.temperature",
}
"""Old dotted ``model.*`` key -> where it lives now."""

MOVED_KEYS: dict[str, str] = {**MOVED_MODEL_KEYS, **MOVED_DATA_KEYS}
"""Every old dotted key -> where it lives now (`midus.data.moved_keys.SOURCE`: the group of ``data.source``)."""


def check_moved_keys(args: list[str]) -> None:
    """Raise ValueError naming the first moved key found in `args` or its ``--config`` files."""
    data_keys.check_moved_keys(args, MOVED_KEYS)


def check_moved_config(config: dict[str, Any], source: str) -> None:
    """Raise ValueError naming the first moved key of a config mapping read from `source`."""
    data_keys.check_config(config, MOVED_KEYS, source)


def upgrade_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of a config the kit wrote before keys moved, every moved key at its new place
    (`prefix`: ``"model."`` for a checkpoint's hyperparameters, the ``model`` section)."""
    return data_keys.upgrade_config(config, MOVED_KEYS, prefix)
