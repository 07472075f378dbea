"""Depth up-scaling surgery on a kit model: DUS copies and MIDUS memory blocks.

Every operation builds a new `MidusLM` whose stack is described by a *plan*: for each new
block, where its weights come from. Embeddings, the final norm and the head are always the
base's. A plan entry is one of

    ("copy", i)      block i of the base, every weight copied
    ("zeroed", i)    a copy of block i whose attention output and FFN down projections are
                     zero, so the block adds nothing to the residual stream (LLaMA Pro)
    ("memory", i)    a new memory block after base block i; its attention (q/k/v, and the
                     per-head q/k norms of a ``qk_norm`` model) and norm copied from block i
                     (``attn_init: copy``) or left random, values from the branch's own
                     initialisation (zero by default: an identity)

A base whose heads are decoupled (n_heads · head_dim ≠ d_model, Qwen3-0.6B and -4B) takes memory
blocks as well: the copied attention gives n_heads · head_dim wide heads, and the branch returns to
d_model by itself (HML with ``memory.combine: sum``, PKM, multi-head PKM; see `ModelConfig`).

The functions return the new model and the indices of the inserted blocks (the ones a
``trainable: new`` policy trains).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from midus.model.config import LayerSpec
from midus.model.memory_config import MemoryConfig
from midus.model.transformer import MidusLM
from midus.upscale.config import UpscaleConfig

PlanEntry = tuple[str, int]


def insertion_points(n_blocks: int, every: int, positions: list[int], field_prefix: str = "model.upscale") -> list[int]:
    """Base block indices to insert after, from `every` or `positions` (exactly one of them)."""
    if bool(every) == bool(positions):
        raise ValueError(
            f"{field_prefix}: give exactly one of `every` (> 0) or `positions` "
            f"(got every={every}, positions={positions})"
        )
    if every:
        if every < 0:
            raise ValueError(f"{field_prefix}.every must be positive, got {every}")
        return list(range(every - 1, n_blocks, every))
    for index, position in enumerate(positions):
        if not 0 <= position < n_blocks:
            raise ValueError(
                f"{field_prefix}.positions[{index}]={position} is out of range: the base has {n_blocks} blocks "
                f"(0..{n_blocks - 1})"
            )
    if len(set(positions)) != len(positions):
        raise ValueError(f"{field_prefix}.positions={positions} lists a block twice")
    return sorted(positions)


def build_from_plan(
    base: MidusLM,
    plan: list[PlanEntry],
    memory: MemoryConfig | None = None,
    memory_branch: str = "hml",
    attn_init: str = "copy",
) -> MidusLM:
    """A new model whose blocks follow `plan` (see the module docstring)."""
    base_stack = base.config.stack
    if (
        memory is not None
        and memory != base.config.memory
        and any(kind != "memory" and base_stack[source].block == "memory" for kind, source in plan)
    ):
        raise ValueError(
            "model.upscale.memory differs from the memory settings of the base's own memory blocks; "
            "up-scaling a MIDUS model again needs the same memory settings"
        )
    layers = [LayerSpec("memory", memory_branch) if kind == "memory" else base_stack[source] for kind, source in plan]
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
    for new_index, (kind, source) in enumerate(plan):
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
    for new_index, (kind, _) in enumerate(plan):
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


def upscale(base: MidusLM, settings: UpscaleConfig) -> tuple[MidusLM, list[int]]:
    """Apply `settings.method` to `base`; returns (up-scaled model, indices of inserted blocks)."""
    n = base.config.depth
    method = settings.method
    if method == "none":
        return base, []
    if method == "dus_solar":
        if not 0 <= settings.drop < n:
            raise ValueError(f"model.upscale.drop={settings.drop} must be in 0..{n - 1} for a {n}-block base")
        # First copy without its last m blocks, second copy without its first m.
        plan = [("copy", i) for i in range(n - settings.drop)] + [("copy", i) for i in range(settings.drop, n)]
        return build_from_plan(base, plan), list(range(n - settings.drop, len(plan)))
    if method == "dus_top":
        if not 0 < settings.top_blocks <= n:
            raise ValueError(f"model.upscale.top_blocks={settings.top_blocks} must be in 1..{n} for a {n}-block base")
        kind = "zeroed" if settings.zero_init_copies else "copy"
        plan = [("copy", i) for i in range(n)] + [(kind, i) for i in range(n - settings.top_blocks, n)]
        return build_from_plan(base, plan), list(range(n, len(plan)))
    if method not in ("dus_interleave", "midus"):
        raise ValueError(f"model.upscale.method={method!r} is not known")
    after = insertion_points(n, settings.every, settings.positions)
    inserted_kind = "zeroed" if method == "dus_interleave" else "memory"
    plan: list[PlanEntry] = []
    for i in range(n):
        plan.append(("copy", i))
        if i in after:
            plan.append((inserted_kind, i))
    if method == "midus":
        _check_adjacent_memory(base.config.stack, plan, settings.allow_adjacent_memory)
        model = build_from_plan(base, plan, settings.memory, settings.branch, settings.attn_init)
    else:
        model = build_from_plan(base, plan)
    return model, [index for index, (kind, _) in enumerate(plan) if kind != "copy"]


def _check_adjacent_memory(base_stack: list[LayerSpec], plan: list[PlanEntry], allowed: bool) -> None:
    kinds = [
        "memory" if kind == "memory" or base_stack[source].block == "memory" else "transformer" for kind, source in plan
    ]
    for index in range(1, len(kinds)):
        if kinds[index] == kinds[index - 1] == "memory" and not allowed:
            raise ValueError(
                f"model.upscale: the up-scaled stack would have memory blocks at {index - 1} and {index} in a row; "
                "choose other positions or set model.upscale.allow_adjacent_memory: true"
            )


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
