"""Depth up-scaling surgery on a kit model: a method's plan turned into a deeper model.

    upscale(base, settings) ─ methods: settings.method's plan builder ─ Plan ─ build_from_plan ─ MidusLM

Every method (`midus.upscale.methods`) describes the new stack as a `Plan` (`midus.upscale.plan`:
for each new block, where its weights come from); `build_from_plan` builds it. Embeddings, the
final norm and the head are always the base's.

A base whose heads are decoupled (n_heads · head_dim ≠ d_model, Qwen3-0.6B and -4B) takes memory
blocks as well: the copied attention gives n_heads · head_dim wide heads, and the branch returns to
d_model by itself (HML with ``memory.combine: sum``, PKM, multi-head PKM; see `ModelConfig`).

`upscale` returns the new model and the indices of the inserted blocks (the ones a
``trainable: new`` policy trains).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from midus.model.config import LayerSpec
from midus.model.transformer import MidusLM
from midus.upscale.config import NO_UPSCALING, UpscaleConfig, upscale_method
from midus.upscale.plan import Plan


def upscale(base: MidusLM, settings: UpscaleConfig) -> tuple[MidusLM, list[int]]:
    """Apply `settings.method` to `base`; returns (up-scaled model, indices of inserted blocks)."""
    if settings.method == NO_UPSCALING:
        return base, []
    plan = upscale_method(settings.method).build_plan(base, settings)
    return build_from_plan(base, plan), plan.inserted


def build_from_plan(base: MidusLM, plan: Plan) -> MidusLM:
    """A new model whose blocks follow `plan.blocks` (see `midus.upscale.plan`)."""
    memory, memory_branch, attn_init = plan.memory, plan.memory_branch, plan.attn_init
    base_stack = base.config.stack
    if (
        memory is not None
        and memory != base.config.memory
        and any(kind != "memory" and base_stack[source].block == "memory" for kind, source in plan.blocks)
    ):
        raise ValueError(
            "model.upscale.memory differs from the memory settings of the base's own memory blocks; "
            "up-scaling a MIDUS model again needs the same memory settings"
        )
    layers = [
        LayerSpec("memory", memory_branch) if kind == "memory" else base_stack[source] for kind, source in plan.blocks
    ]
    try:
        config = dataclasses.replace(
            base.config, layers=layers, n_layers=len(layers), memory_layers=[], memory=memory or base.config.memory
        )
    except ValueError as error:
        if memory is None:
            raise
        # E.g. a base with decoupled heads (Qwen3-0.6B) and HML with memory.combine: concat: the
        # fields the message names are the up-scaling section's.
        raise ValueError(
            f"model.upscale: the memory blocks (branch={memory_branch!r}, memory.* = model.upscale.memory.*) do not "
            f"fit the base: {error}"
        ) from error
    device, dtype = base.embed.weight.device, base.embed.weight.dtype
    model = MidusLM(config).to(device=device, dtype=dtype)
    state = model.state_dict()
    base_state = base.state_dict()
    for name in ("embed.weight", "norm.weight", "lm_head.weight"):
        state[name] = base_state[name]
    for new_index, (kind, source) in enumerate(plan.blocks):
        prefix, base_prefix = f"blocks.{new_index}.", f"blocks.{source}."
        for name, value in base_state.items():
            if not name.startswith(base_prefix):
                continue
            target = prefix + name[len(base_prefix) :]
            # "attn." covers q/k/v/o and, with qk_norm, attn.q_norm/attn.k_norm: a memory block's
            # attention computes exactly what the block it copies computes.
            if kind != "memory" or (
                attn_init == "copy" and name[len(base_prefix) :].startswith(("attn_norm.", "attn."))
            ):
                if target in state:  # a memory block has no o_proj
                    state[target] = value
    model.load_state_dict(state)
    for new_index, (kind, _) in enumerate(plan.blocks):
        if kind == "zeroed":
            _zero_block_output(model.blocks[new_index], new_index)
    return model


def _zero_block_output(block: nn.Module, index: int) -> None:
    # The two projections that write into the residual stream: zero makes the block an identity.
    down = getattr(block.branch, "down_proj", None)
    if block.attn.o_proj is None or down is None:
        raise ValueError(f"block {index}: only Transformer blocks with an ffn branch can be inserted as zeroed copies")
    with torch.no_grad():
        for projection in (block.attn.o_proj, down):
            projection.weight.zero_()
            if projection.bias is not None:
                projection.bias.zero_()


def apply_trainable(model: MidusLM, inserted: list[int], policy: str) -> None:
    """Freeze what `policy` does not train: ``all``, ``new`` (inserted blocks) or ``new_and_norms``."""
    if policy not in ("all", "new", "new_and_norms"):
        raise ValueError(f"model.upscale.trainable={policy!r}; expected all, new or new_and_norms")
    for parameter in model.parameters():
        parameter.requires_grad_(policy == "all")
    if policy == "all":
        return
    for index in inserted:
        model.blocks[index].requires_grad_(True)
    if policy == "new_and_norms":
        for module in model.modules():
            if isinstance(module, nn.RMSNorm):
                module.requires_grad_(True)
