"""PKM (Lample et al., 2019): one learned query, one product-key space, one value table of width d."""

from __future__ import annotations

import torch
from torch import nn

from midus.branches.product_keys import ProductKeys
from midus.branches.registry import register_branch
from midus.branches.value_lookup import MemoryValues
from midus.model.config import ModelConfig


@register_branch("pkm")
class ProductKeyMemory(nn.Module):
    """x → query projection (width ``memory.pkm_query_dim``) → top-k of n² slots → weighted sum of d-wide values."""

    is_product_key_memory = True

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        memory = config.memory
        query_dim = memory.query_dim(config.d_model)
        self.query_proj = nn.Linear(config.d_model, query_dim, bias=False)
        self.keys = ProductKeys(1, query_dim, memory.n_subkeys, memory.topk, memory.query_norm)
        self.values = MemoryValues(memory.n_slots, config.d_model, memory.zero_init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, time, d) -> query (batch, time, 1, c) -> weights, slots (batch, time, 1, k)
        weights, slots = self.keys(self.query_proj(x).unsqueeze(-2))
        return self.values(slots.squeeze(-2), weights.squeeze(-2))  # (batch, time, d)
