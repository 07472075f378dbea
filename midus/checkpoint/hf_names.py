"""Tensor names of a Hugging Face Llama-family (and Qwen3) checkpoint and the kit names they map to.

One table for both directions (`hf_import` reads it, `hf_export` inverts it), so import and
export cannot drift apart.
"""

from __future__ import annotations

# Looked for in this order; the first pattern with a match decides the format.
WEIGHT_PATTERNS = (
    "model.safetensors.index.json", "model*.safetensors", "pytorch_model.bin.index.json", "pytorch_model*.bin",
)

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "branch_norm.weight",
    **{f"self_attn.{p}_proj.{t}": f"attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
    **{f"self_attn.{p}_norm.weight": f"attn.{p}_norm.weight" for p in "qk"},  # Qwen3's per-head norms
    **{f"mlp.{p}_proj.weight": f"branch.{p}_proj.weight" for p in ("gate", "up", "down")},
}
"""HF name inside ``model.layers.<i>.`` → kit name inside ``blocks.<i>.``."""

TOP_NAMES = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
"""HF name outside the layers (``model.`` prefix stripped) → kit name."""
