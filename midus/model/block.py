"""The Transformer block: x + Attn(norm x), then x + branch(norm x)."""

from __future__ import annotations

import torch
from torch import nn

from midus.model.attention import CausalSelfAttention
from midus.model.branches.registry import build_branch
from midus.model.config import ModelConfig
from midus.model.kv_cache import KVCache


class TransformerBlock(nn.Module):
    """Pre-norm Llama block whose second residual branch is chosen by name."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        spec = config.stack[layer_index]
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_index)
        self.branch_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.branch = build_branch(spec.branch, config, layer_index)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        # x: (batch, time, d_model) -> same shape
        x = x + self.attn(self.attn_norm(x), rope, cache, start)
        return x + self.branch(self.branch_norm(x))
