"""HML, the head-wise memory layer of MIDUS, with HIVE or explicit value tables.

Each attention head's output a_h (width d_h) is its own query into its own product-key
space (no query projection). What the k retrieved slots return depends on `memory.values`:

    hive:      z_h = Σ_i w_i · U[slot_i]   (U: one n² × d_l bank per block, pooled first)
               o_h = z_h · P_h             (P_h: d_l × d_h, projected after; U·P_h never built)
    per_head:  o_h = Σ_i w_i · V_h[slot_i] (V_h: n² × d_h, one table per head)
    shared:    o_h = Σ_i w_i · V[slot_i]   (V: n² × d_h, read by every head)

    output = concat_h o_h                  (combine: concat, the paper's default)
           = Σ_h o_h with o_h of width d   (combine: sum; value rows / P_h then end in d)

(n² slots per table with the default two sub-spaces; nᵖ with ``memory.n_subspaces`` = p.)

Decoupled heads (n_heads · head_dim ≠ d_model, Qwen3-0.6B: 16 heads of 128 on d = 1024): the
queries are still the heads a_h of width d_h, each in its own product-key space, but concat_h o_h
would be H·d_h wide, not d. Such a model needs ``combine: sum``: each head's values return to d by
themselves (HIVE: P_h is d_l × d, so o_h = z_h · P_h; per_head / shared: value rows of width d) and
the heads' outputs are summed. There is still no mixing across heads before the values and no
output projection after them; Σ_h z_h · P_h is exactly what a projection of concat_h (z_h · P'_h)
back to d would compute, folded into the P_h. Zero values still make the output exactly zero.
"""

from __future__ import annotations

import torch
from torch import nn

from midus.model.branches.registry import MemoryBranch, register_branch
from midus.model.config import ModelConfig
from midus.model.retrieval.product_keys import ProductKeys
from midus.model.retrieval.value_lookup import MemoryValues


@register_branch("hml")
class HeadwiseMemory(MemoryBranch):
    """Head-wise product-key memory reading the attention heads (memory blocks only)."""

    reads_attention_heads = True

    @classmethod
    def decoupled_heads_error(cls, memory) -> str | None:
        # The heads are the queries, so they must arrive unprojected, and the output must come
        # back to d_model by the values themselves (combine: sum), see the module docstring.
        if memory.attn_output_projection:
            return ("memory.attn_output_projection=true hands HML the d_model-wide W_O projection, which does not "
                    "split into n_heads queries of head_dim; set memory.attn_output_projection: false")
        if memory.combine != "sum":
            return (f"memory.combine={memory.combine!r} concatenates the heads' outputs, n_heads · head_dim wide, "
                    "into the d_model-wide residual stream; set memory.combine: sum (each head's values, or HIVE "
                    "projection P_h, then end in d_model and the heads' outputs are summed)")
        return None

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        memory = config.memory
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.layout, self.combine = memory.values, memory.combine
        self.n_slots = memory.n_slots
        out_width = self.head_dim if self.combine == "concat" else config.d_model
        # memory.head_topk: this block's row (rows follow the HML memory blocks in stack order).
        head_topk = list(memory.head_topk[config.hml_memory_layers().index(layer_index)]) if memory.head_topk else None
        self.keys = ProductKeys(
            self.n_heads, self.head_dim, memory.n_subkeys, memory.topk, memory.query_norm, memory.score_scale,
            memory.key_norm, memory.n_subspaces, head_topk,
        )
        if self.layout == "hive":
            self.values = MemoryValues(self.n_slots, memory.latent_dim, memory.zero_init_values)
            scale = 0.0 if memory.zero_init_head_proj else memory.latent_dim**-0.5
            self.head_proj = nn.Parameter(torch.randn(self.n_heads, memory.latent_dim, out_width) * scale)
        else:
            tables = self.n_heads if self.layout == "per_head" else 1
            self.values = MemoryValues(tables * self.n_slots, out_width, memory.zero_init_values)
            self.head_proj = None

    def value_row_reads(self, counts: torch.Tensor) -> torch.Tensor:
        # per_head: head h owns rows h·n² .. (h+1)·n² - 1 (see `read`); hive and shared: one table.
        return counts.flatten() if self.layout == "per_head" else counts.sum(0)

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        # heads: (batch, time, H·d_h) = concatenated a_h -> queries (batch, time, H, d_h)
        weights, slots = self.keys(heads.unflatten(-1, (self.n_heads, self.head_dim)))  # (batch, time, H, k)
        return self.read(weights, slots)

    def read(self, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The values' output for a retrieval: weights, slots (batch, time, H, k) → (batch, time, d).

        Separate from `forward` so the fixed-retrieval analysis can feed recorded retrievals.
        """
        if self.layout == "per_head":
            # Head h reads rows h·n² .. (h+1)·n² - 1 of the stacked tables.
            slots = slots + torch.arange(self.n_heads, device=slots.device)[:, None] * self.n_slots
        if self.layout == "hive":
            latent = self.values(slots, weights)  # (batch, time, H, d_l): pooled before projecting
            if self.combine == "concat":
                return torch.einsum("bthl,hlo->btho", latent, self.head_proj.to(latent.dtype)).flatten(-2)
            return latent.flatten(-2) @ self.head_proj.flatten(0, 1).to(latent.dtype)
        if self.combine == "sum":
            return self.values(slots.flatten(-2), weights.flatten(-2))  # one bag of H·k rows: the sum
        return self.values(slots, weights).flatten(-2)  # (batch, time, H·d_h)
