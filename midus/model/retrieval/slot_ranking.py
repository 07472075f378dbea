"""Which value rows of each memory the new text reads more than the background: the ranking of
sparse memory finetuning (Lin et al. 2025, arXiv 2510.15103).

Per memory block, over batches of the new text and batches of background text (the base's own):

    c_i   reads of value row i in the new batches (top-k accesses of every token and head)
    df_i  background batches that read row i at least once, out of B
    tfidf:      score_i = c_i / Σ_j c_j · log((B + 1) / (df_i + 1))
    frequency:  score_i = c_i

and the t rows of highest score train (ties go to the lower row index, so the choice is a pure
function of the counts). Lin et al. rank the slots of each new batch against the background
anew at every step; the kit ranks once, over the pooled new batches
(`midus.training.sparse_memory`). Reads are counted with the slot-usage hooks
(`midus.model.retrieval.slot_usage`) and mapped to value rows by each branch
(`MemoryBranch.value_row_reads`: HIVE's bank row is a slot read by every head).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from midus.model.block_labels import modules_by_block
from midus.model.branches.registry import MemoryBranch
from midus.model.retrieval.slot_usage import SlotUsageTracker

Ranking = Literal["tfidf", "frequency"]


def memory_branches_by_block(model: nn.Module) -> dict[str, MemoryBranch]:
    """Every product-key memory branch of a model by block label (``"3"``), as slot usage labels them."""
    return modules_by_block(model, lambda module: isinstance(module, MemoryBranch))


@dataclass
class RowReads:
    """Counted reads of one memory's value rows."""

    new: torch.Tensor
    """(rows,) reads in all new batches together."""
    background_batches: torch.Tensor
    """(rows,) number of background batches that read the row at least once."""
    n_background: int
    """Background batches counted (B)."""


@torch.no_grad()
def batch_row_reads(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reads per value row of every memory branch in one forward of `batch` (batch, time) token ids."""
    branches = memory_branches_by_block(model)
    tracker = SlotUsageTracker(model)
    with tracker:
        model(batch)
    reads = {}
    for label, branch in branches.items():
        usage = tracker.usages[label]
        reads[label] = branch.value_row_reads(usage.counts.view(usage.n_heads, usage.n_slots))
    return reads


@torch.no_grad()
def count_row_reads(
    model: nn.Module, new: Iterable[torch.Tensor], background: Iterable[torch.Tensor]
) -> dict[str, RowReads]:
    """`RowReads` of every memory branch over batches of new and of background token ids.

    The model runs in eval mode for the count and goes back to the mode it was in; nothing else
    changes (no parameter, no random state: the forward draws no random numbers).
    """
    was_training = model.training
    model.eval()
    try:
        totals: dict[str, torch.Tensor] = {}
        for batch in new:
            for label, reads in batch_row_reads(model, batch).items():
                totals[label] = totals.get(label, 0) + reads
        presence: dict[str, torch.Tensor] = {}
        n_background = 0
        for batch in background:
            n_background += 1
            for label, reads in batch_row_reads(model, batch).items():
                presence[label] = presence.get(label, 0) + (reads > 0).long()
    finally:
        model.train(was_training)
    return {
        label: RowReads(new_reads, presence.get(label, torch.zeros_like(new_reads)), n_background)
        for label, new_reads in totals.items()
    }


def row_scores(reads: RowReads, ranking: Ranking) -> torch.Tensor:
    """(rows,) float64 scores of `reads` under `ranking` (module docstring)."""
    counts = reads.new.double()
    if ranking == "frequency":
        return counts
    if ranking != "tfidf":
        raise ValueError(f"ranking={ranking!r}; expected tfidf or frequency")
    tf = counts / counts.sum().clamp_min(1.0)
    idf = torch.log((reads.n_background + 1.0) / (reads.background_batches.double() + 1.0))
    return tf * idf


def top_rows(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` rows of highest score, ties to the lower index, in ascending row order."""
    if not 0 < count <= scores.numel():
        raise ValueError(f"cannot choose {count} of {scores.numel()} rows")
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count].sort().values

