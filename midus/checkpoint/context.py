"""The context a checkpoint's model is meant to read: one rule for evaluation and export.

lm-evaluation-harness's ``hf`` model reads ``max_position_embeddings`` from an exported directory;
the kit's own adapter reads a kit checkpoint. Both must arrive at the same number, or the same
weights are scored over different rolling windows (`midus.evaluation.lm_eval_adapter` defaults its
``max_length`` to `model_context`; `midus.checkpoint.export_command` writes it as
``max_position_embeddings``).
"""

from __future__ import annotations

from typing import Any

from midus.model.config import ModelConfig

DEFAULT_CONTEXT = 2048
"""When nothing states a context: HFLM's own fallback ``max_length``."""


def trained_block_size(checkpoint: dict[str, Any]) -> int:
    """The ``data.block_size`` a kit checkpoint was trained with (0 if it does not say)."""
    block_size = (checkpoint.get("datamodule_hyper_parameters") or {}).get("block_size", 0)
    return int(block_size) if isinstance(block_size, int) else 0


def model_context(config: ModelConfig, block_size: int = 0) -> int:
    """Tokens the model is meant to read, from what it states, in this order:

    1. ``config.context_length``: an imported model's ``max_position_embeddings``;
    2. Llama-3 RoPE scaling without it (checkpoints from before the field):
       original_max_position_embeddings x factor;
    3. `block_size`, the training block size (a kit model never saw longer contexts);
    4. `DEFAULT_CONTEXT`.
    """
    if config.context_length:
        return config.context_length
    scaling = config.rope_scaling
    if scaling:
        return int(scaling["original_max_position_embeddings"] * scaling["factor"])
    return block_size or DEFAULT_CONTEXT
