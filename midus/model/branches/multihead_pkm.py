"""Multi-head PKM: a query projection and a product-key space per head, one shared value table.

Each head reads k rows of the same n² × d table; the heads' weighted sums are added. That
sum is one bag of heads × k rows per token, so the lookup is a single weighted bag sum.

In a memory block the query projection reads the concatenated attention heads, n_heads · head_dim
wide (`ModelConfig.branch_input_width`), so the branch works on decoupled heads (Qwen3-0.6B) too:
the value rows are d_model wide whatever the heads' width.
"""

from __future__ import annotations

import torch
from torch import nn

from midus.model.branches.registry import MemoryBranch, register_branch
from midus.model.config import ModelConfig
from midus.model.retrieval.product_keys import ProductKeys
from midus.model.retrieval.value_lookup import MemoryValues


@register_branch("multihead_pkm")
class MultiHeadProductKeyMemory(MemoryBranch):
    """``memory.pkm_heads`` learned queries over their own sub-keys, summed reads of one d-wide table.

    Args:
        config: the model config (``memory`` holds the sizes).
        layer_index: the block this branch belongs to.
        n_heads: query heads; 0 means ``memory.pkm_heads`` (PKM passes 1).
    """


    def __init__(self, config: ModelConfig, layer_index: int, n_heads: int = 0) -> None:
        super().__init__()
        memory = config.memory
        self.n_heads = n_heads or memory.query_heads(config.n_heads)
        query_dim = memory.query_dim(config.d_model)
        self.query_proj = nn.Linear(config.branch_input_width(layer_index), self.n_heads * query_dim, bias=False)
        self.keys = ProductKeys(
            self.n_heads, query_dim, memory.n_subkeys, memory.topk, memory.query_norm, memory.score_scale,
            memory.key_norm, memory.n_subspaces,
        )
        self.values = MemoryValues(memory.n_slots, config.d_model, memory.zero_init_values)

    @classmethod
    def decoupled_heads_error(cls, memory: object) -> str | None:
        return None  # the query projection reads the heads' width; the values write d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, time, branch_input_width) -> queries (batch, time, heads, c)
        #   -> weights, slots (batch, time, heads, k)
        weights, slots = self.keys(self.query_proj(x).unflatten(-1, (self.n_heads, -1)))
        return self.values(slots.flatten(-2), weights.flatten(-2))  # sum over heads and k: (batch, time, d)
