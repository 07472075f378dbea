"""Causal multi-head self-attention with grouped key/value heads (Llama layout).

`head_outputs` returns the per-head results a_h before the output projection; memory
blocks read those as queries, Transformer blocks project them with `o_proj`. With
`qk_norm` (Qwen3), each head's query and key is RMS-normalised before the rotary embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from midus.model.config import ModelConfig
from midus.model.kv_cache import KVCache
from midus.model.rotary import apply_rotary


class CausalSelfAttention(nn.Module):
    """Rotary, grouped-query causal attention through `scaled_dot_product_attention`.

    Heads are ``config.head_dim`` wide, so q/k/v project d_model to heads · head_dim and
    ``o_proj`` projects n_heads · head_dim back to d_model (equal widths unless `head_width` is set).
    """

    def __init__(self, config: ModelConfig, layer_index: int, output_projection: bool = True) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        kv_width = config.kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.attention_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv_width, bias=config.qkv_bias)
        self.o_proj = (
            nn.Linear(config.attention_width, config.d_model, bias=config.attn_out_bias) if output_projection else None
        )
        # Only created with qk_norm, so models without it keep their parameters and state-dict keys.
        self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None

    def head_outputs(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Per-head attention results: x (batch, time, d) -> (batch, time, heads, head_dim)."""
        batch, time, _ = x.shape
        q = self.q_proj(x).view(batch, time, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, time, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, time, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over head_dim, per head and position
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, start, k, v)
        gqa = self.n_kv_heads != self.n_heads
        if k.shape[2] == time:
            # Whole sequence at once (training, or a prefill from position 0).
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif time == 1:
            # One new token sees every cached position.
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            # A chunk after cached positions: query i (at start+i) sees keys 0..start+i.
            query_pos = torch.arange(start, start + time, device=x.device)
            key_pos = torch.arange(k.shape[2], device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x: (batch, time, d) -> (batch, time, d), heads concatenated and projected."""
        heads = self.head_outputs(x, rope, cache, start)
        merged = heads.reshape(x.shape[0], x.shape[1], -1)
        if self.o_proj is None:
            return merged
        return self.o_proj(merged)
