"""PKM (Lample et al., 2019): one learned query, one product-key space, one value table of width d.

It is the one-head case of the multi-head PKM, so it shares that implementation.
"""

from __future__ import annotations

from midus.model.branches.multihead_pkm import MultiHeadProductKeyMemory
from midus.model.branches.registry import register_branch
from midus.model.config import ModelConfig


@register_branch("pkm")
class ProductKeyMemory(MultiHeadProductKeyMemory):
    """x → query projection (width ``memory.pkm_query_dim``) → top-k of n² slots → weighted sum of d-wide values."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index, n_heads=1)
