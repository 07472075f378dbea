"""Minimal single-file models for benchmarks/small_model_speed.py: nanoGPT, nanoGPT with one Llama part, Llama.

`MinimalGPT` is nanoGPT's GPT (learned positions, LayerNorm, fused q/k/v, GELU MLP 4·d, tied
embeddings, no dropout or biases). Its three switches each put one part of the kit's Llama
architecture in nanoGPT's place, so that a side-by-side run shows what each part costs in eager
PyTorch at a given shape:

* ``norm="rms"``: `nn.RMSNorm` (eps 1e-5) for every LayerNorm;
* ``positions="rope"``: rotate-half rotary embeddings on q and k instead of learned positions;
* ``mlp="swiglu"``: SwiGLU of width ``hidden`` (the kit's 384 at d 128) instead of GELU 4·d.

`MinimalLlama` is all three at once with separate q/k/v projections (``qkv="separate"``): the kit
model's architecture (`midus.model.MidusLM` with the FFN branch, no grouped KV heads) written out
plainly. The code is deliberately plain PyTorch, the way a single-file training script writes it,
and shares nothing with `midus.model` (not even its rotary tables): it is the reference the kit is
timed and checked against (tests/test_minimal_models.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(head_dim: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotate-half layout (theta 10000): each (block, head_dim)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(block).float(), inv_freq).repeat(1, 2)
    return angles.cos(), angles.sin()


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE as Hugging Face's Llama writes it: t·cos + (-t2, t1)·sin."""
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin


def make_norm(kind: str, width: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(width, bias=False)
    if kind == "rms":
        return nn.RMSNorm(width, eps=1e-5)
    raise ValueError(f"norm: expected 'layer' or 'rms', got {kind!r}")


class MinimalBlock(nn.Module):
    """nanoGPT's block without dropout or biases; `norm`, `rope`, `mlp` and `qkv` swap in one Llama part."""

    def __init__(self, width: int, heads: int, norm: str = "layer", rope: bool = False, mlp: str = "gelu",
                 hidden: int | None = None, qkv: str = "fused") -> None:
        super().__init__()
        if mlp not in ("gelu", "swiglu") or (mlp == "swiglu" and not hidden):
            raise ValueError(f"mlp: expected 'gelu', or 'swiglu' with a hidden width; got {mlp!r}, hidden {hidden}")
        if qkv not in ("fused", "separate"):
            raise ValueError(f"qkv: expected 'fused' or 'separate', got {qkv!r}")
        self.heads, self.rope, self.mlp, self.fused_qkv = heads, rope, mlp, qkv == "fused"
        self.ln_1, self.ln_2 = make_norm(norm, width), make_norm(norm, width)
        if self.fused_qkv:
            self.c_attn = nn.Linear(width, 3 * width, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.c_proj = nn.Linear(width, width, bias=False)
        if mlp == "gelu":
            self.c_fc = nn.Linear(width, 4 * width, bias=False)
            self.mlp_proj = nn.Linear(4 * width, width, bias=False)
        else:
            self.gate, self.up = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
            self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, time_, width = x.shape
        h = self.ln_1(x)
        q, k, v = self.c_attn(h).split(width, dim=2) if self.fused_qkv else (self.q(h), self.k(h), self.v(h))
        q, k, v = (t.view(batch, time_, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(batch, time_, width))
        h = self.ln_2(x)
        if self.mlp == "gelu":
            return x + self.mlp_proj(F.gelu(self.c_fc(h)))
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class MinimalGPT(nn.Module):
    """nanoGPT's GPT: token + learned position embeddings, blocks, LayerNorm, tied head (see the module doc)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, block: int, norm: str = "layer",
                 positions: str = "learned", mlp: str = "gelu", hidden: int | None = None, qkv: str = "fused") -> None:
        super().__init__()
        if positions not in ("learned", "rope"):
            raise ValueError(f"positions: expected 'learned' or 'rope', got {positions!r}")
        rope = positions == "rope"
        self.wte = nn.Embedding(vocab, width)
        self.wpe = None if rope else nn.Embedding(block, width)
        self.blocks = nn.ModuleList(MinimalBlock(width, heads, norm, rope, mlp, hidden, qkv)
                                    for _ in range(layers))
        self.ln_f = make_norm(norm, width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        cos, sin = rope_tables(width // heads, block) if rope else (torch.empty(0), torch.empty(0))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        cos, sin = self.cos[: ids.shape[1]], self.sin[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.ln_f(x))


class MinimalLlama(MinimalGPT):
    """A single-file Llama of the kit model's shape: all three parts, separate q/k/v (tied embeddings, no GQA)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, hidden: int, block: int) -> None:
        super().__init__(vocab, width, layers, heads, block, norm="rms", positions="rope", mlp="swiglu",
                         hidden=hidden, qkv="separate")
