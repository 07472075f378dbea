"""The plan of an up-scaled stack: for each block of the new model, where its weights come from.

An up-scaling method (`midus.upscale.methods`) only writes a `Plan`; `surgery.build_from_plan`
turns it into a model. Embeddings, the final norm and the head are always the base's. A plan
entry is one of

    ("copy", i)      block i of the base, every weight copied
    ("zeroed", i)    a copy of block i whose attention output and FFN down projections are
                     zero, so the block adds nothing to the residual stream (LLaMA Pro)
    ("memory", i)    a new memory block after base block i; its attention (q/k/v, and the
                     per-head q/k norms of a ``qk_norm`` model) and norm copied from block i
                     (``attn_init: copy``) or left random, values from the branch's own
                     initialisation (zero by default: an identity)

For example, interleaving after every second block of a 4-block base (T = Transformer block):

    base   T0 T1 T2 T3
    plan   (copy 0) (copy 1) (zeroed 1) (copy 2) (copy 3) (zeroed 3)     inserted: [2, 5]
"""

from __future__ import annotations

from dataclasses import dataclass

from midus.model.memory_config import MemoryConfig

PlanEntry = tuple[str, int]
"""(kind, base block index): kind ``copy``, ``zeroed`` or ``memory`` (see the module docstring)."""


@dataclass(frozen=True)
class Plan:
    """What a method makes of a base: the new stack, which of its blocks are new, and how memory
    blocks are built."""

    blocks: list[PlanEntry]
    """For each block of the up-scaled model, in order: where its weights come from."""
    inserted: list[int]
    """Indices into `blocks` of the added blocks: the ones ``trainable: new`` trains."""
    memory: MemoryConfig | None = None
    """Settings of the ``memory`` entries (and of the new model); None keeps the base's."""
    memory_branch: str = "hml"
    """The ``memory`` entries' branch."""
    attn_init: str = "copy"
    """``copy``: a ``memory`` entry starts its attention and norm as those of its base block; ``random``."""


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


def interleaved(n_blocks: int, after: list[int], kind: str) -> list[PlanEntry]:
    """Every base block copied, with a `kind` entry of block i right after block i for i in `after`."""
    blocks: list[PlanEntry] = []
    for i in range(n_blocks):
        blocks.append(("copy", i))
        if i in after:
            blocks.append((kind, i))
    return blocks


def added(blocks: list[PlanEntry]) -> list[int]:
    """Indices of the entries that are not plain copies: the inserted blocks of an interleaved plan."""
    return [index for index, (kind, _) in enumerate(blocks) if kind != "copy"]
