"""``midus``: memory blocks inserted after base blocks (method notes §1–2).

    base    T0 T1 T2 T3                       every: 2 (or positions: [1, 3])
    deeper  T0 T1 M1 T2 T3 M3                 M = x + branch(Attn'(norm x)), branch: hml, pkm, …

A memory block's attention (and its norm) starts as a copy of the block it follows
(``attn_init: copy``) or random; its values start at zero by default, so the deeper model
starts as the base's function (`MemoryConfig` lists the other exact identities).
"""

from __future__ import annotations

from midus.model.config import LayerSpec
from midus.model.transformer import MidusLM
from midus.upscale.config import UpscaleConfig, register_upscale
from midus.upscale.plan import Plan, PlanEntry, added, insertion_points, interleaved


@register_upscale("midus", identity_at_insertion=True)
def memory_plan(base: MidusLM, settings: UpscaleConfig) -> Plan:
    """A memory block carrying `settings.branch` after every `every`-th base block, or after `positions`."""
    n = base.config.depth
    blocks = interleaved(n, insertion_points(n, settings.every, settings.positions), "memory")
    _check_adjacent_memory(base.config.stack, blocks, settings.allow_adjacent_memory)
    return Plan(
        blocks, inserted=added(blocks), memory=settings.memory, memory_branch=settings.branch,
        attn_init=settings.attn_init,
    )


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
