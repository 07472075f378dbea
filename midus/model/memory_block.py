"""The MIDUS memory block: M(x) = x + branch(Attn'(norm x)).

    x ─┬─ norm ─ Attn' (no W_O) ─ a_1 … a_H ─ concat ─ [+ x if internal_residual] ─ branch ─┐
       └────────────────────────────────────────────────────────────────────────────────── + ─ out

Only the branch output enters the residual stream: the attention heads are the memory's
queries, not an update. The heads are n_heads · head_dim wide, which is d_model unless the
model's heads are decoupled (Qwen3-0.6B); the branch always writes d_model (HML on decoupled
heads with ``memory.combine: sum``: each head's values end in d_model, the heads are summed).
With zero-initialised memory values, or with ``memory.output_gate`` (a per-channel gate on the
branch output that starts at zero), the block is an exact identity.
"""

from __future__ import annotations

import torch
from torch import nn

from midus.model.attention import CausalSelfAttention
from midus.model.branches.registry import build_branch
from midus.model.config import ModelConfig
from midus.model.kv_cache import KVCache


class MemoryBlock(nn.Module):
    """Attention without output projection feeding a memory branch (HML by default)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        spec = config.stack[layer_index]
        # Same names as TransformerBlock, so attention weights copy across by key.
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        # Attn' (no W_O) unless memory.attn_output_projection asks for full attention.
        self.attn = CausalSelfAttention(config, layer_index, output_projection=config.memory.attn_output_projection)
        self.branch = build_branch(spec.branch, config, layer_index)
        self.internal_residual = config.memory.internal_residual
        # memory.output_gate: g ⊙ branch, g from zero (a 1-D parameter: no weight decay).
        self.output_gate = nn.Parameter(torch.zeros(config.d_model)) if config.memory.output_gate else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        # x: (batch, time, d_model) -> same shape
        heads = self.attn(self.attn_norm(x), rope, cache, start)  # (batch, time, H·d_h), W_O (to d) only if kept
        query = x + heads if self.internal_residual else heads
        update = self.branch(query)
        return x + (update * self.output_gate.to(update.dtype) if self.output_gate is not None else update)
