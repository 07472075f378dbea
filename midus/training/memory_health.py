"""The summary's memory-health record: is each memory read evenly, sharply, and does it matter?

Read at the end of a fit from the final validation's metrics (`CausalLM` logs them):

* ``memory_usage``: the slot diagnostics of `midus.model.retrieval.slot_usage` (``usage``,
  ``kl_uniform``, ``entropy``) averaged over memory blocks, plus ``entropy_over_log_k``
  (1 = flat retrieval weights, what an unused memory shows; each head against its own k under
  ``memory.head_topk``) and the same per block;
* ``memory_zeroed_delta``: what zeroing the memory branches costs (`midus.training.memory_zeroed`);
* ``memory_engaged_step``: the first validation step at which zeroing every memory branch costs
  at least `ENGAGED_LOSS_NATS` of validation loss or `ENGAGED_RECALL_DROP` of recall — for an
  inserted block (an identity at insertion), how many steps the memory needed to matter.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from torch import nn

from midus.model.retrieval.slot_usage import product_key_modules

ENGAGED_LOSS_NATS = 0.01
"""Zeroing costs at least this much validation loss (nats): the memory is engaged."""
ENGAGED_RECALL_DROP = 0.05
"""... or at least this much recall accuracy (phrasing seen in training)."""
_SLOT_STATS = ("usage", "kl_uniform", "entropy")


def memory_zeroed_delta(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The final validation's ``memory/zeroed/…`` metrics (`midus.training.memory_zeroed`) as
    ``{"loss": Δ nats, "<recall>": drop, …, "blocks": {"<block>": {same keys}}}``; None without memory."""
    record: dict[str, Any] = {}
    for name, value in trainer.callback_metrics.items():
        if not name.startswith("memory/zeroed/"):
            continue
        *block, stat = name.removeprefix("memory/zeroed/").split("/")
        key = stat.removesuffix("_delta") if stat == "loss_delta" else stat.removesuffix("_drop")
        target = record.setdefault("blocks", {}).setdefault(block[0], {}) if block else record
        target[key] = float(value)
    return record or None


def memory_usage(trainer: pl.Trainer, model: nn.Module) -> dict[str, Any] | None:
    """The final validation's slot diagnostics, mean over memory blocks and per block; None
    without product-key memory or before any full validation."""
    blocks: dict[str, dict[str, float]] = {}
    for layer, keys in product_key_modules(model).items():
        stats = {stat: trainer.callback_metrics.get(f"memory/{layer}/{stat}") for stat in _SLOT_STATS}
        if any(value is None for value in stats.values()):
            continue
        block = {stat: float(value) for stat, value in stats.items()}
        block["entropy_over_log_k"] = _entropy_over_log_k(trainer, layer, keys, block["entropy"])
        blocks[layer] = block
    if not blocks:
        return None
    means = {stat: sum(block[stat] for block in blocks.values()) / len(blocks) for stat in next(iter(blocks.values()))}
    return {**means, "blocks": blocks}


def _entropy_over_log_k(trainer: pl.Trainer, layer: str, keys: nn.Module, entropy: float) -> float:
    """The block's retrieval-weight entropy over its maximum, log k; under per-head k
    (``memory.head_topk``) the mean over heads of each head's entropy over log k_h, since a head
    reading k_h slots cannot exceed log k_h (a head with k_h = 1 counts 0)."""
    if keys.head_keep is None:
        return entropy / math.log(keys.topk) if keys.topk > 1 else 0.0
    ratios = []
    for head, head_k in enumerate(keys.head_keep.sum(-1).tolist()):
        head_entropy = trainer.callback_metrics[f"memory/{layer}/{head}/entropy"]
        ratios.append(float(head_entropy) / math.log(head_k) if head_k > 1 else 0.0)
    return sum(ratios) / len(ratios)


def memory_engaged(trainer: pl.Trainer) -> bool:
    """Whether this validation's zeroed-memory cost reaches the engagement thresholds."""
    loss = trainer.callback_metrics.get("memory/zeroed/loss_delta")
    recall = trainer.callback_metrics.get("memory/zeroed/recall_acc_drop")
    return bool(
        (loss is not None and float(loss) >= ENGAGED_LOSS_NATS)
        or (recall is not None and float(recall) >= ENGAGED_RECALL_DROP)
    )
