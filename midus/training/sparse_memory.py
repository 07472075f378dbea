"""Sparse memory finetuning in a fit (``model.sparse_memory``; Lin et al. 2025, arXiv 2510.15103).

Before a fit trains, `choose_rows` counts each memory's value-row reads on ``count_batches`` batches
of the new text and as many of the background text (`TextData.population_blocks`), ranks the rows
(`midus.model.retrieval.slot_ranking`) and keeps the top ``trainable_slots`` per memory block;
`make_sparse` then puts a `SparseRowValues` in place of each value table (a trainable (t, width)
parameter and a frozen rest, so the optimizer's state is t rows, not the table) and, with
``freeze_rest``, freezes every other parameter. `CausalLM` calls both from ``setup("fit")``.

The chosen rows are a checkpoint entry (`midus.checkpoint.kit.SPARSE_MEMORY_KEY`); a resumed fit
takes them from there (`CausalLM.on_load_checkpoint`) instead of counting again, so it trains the
same rows. The weights a checkpoint holds are the ordinary model's (each table merged), so
``validate``, the analyses and ``export`` read it as any other.

Where the kit differs from Lin et al.: the rows are ranked once, before the first step, over the
pooled new batches (they rank every batch anew); the background is the base's own documents (they
use pretraining data); the optimizer is the run's AdamW with its memory group (they report SGD
working better than AdamW for sparse updates).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from midus.checkpoint.kit import frozen_parameter_names
from midus.model.branches.registry import MemoryBranch
from midus.model.retrieval.slot_ranking import count_row_reads, memory_branches_by_block, row_scores, top_rows
from midus.model.retrieval.sparse_values import SparseRowValues
from midus.training.config import SparseMemoryConfig

log = logging.getLogger(__name__)


def _memories(model: nn.Module, settings: SparseMemoryConfig) -> dict[str, MemoryBranch]:
    branches = memory_branches_by_block(model)
    if not branches:
        raise ValueError(
            f"model.sparse_memory.trainable_slots={settings.trainable_slots}: the model has no product-key memory "
            "(memory blocks of model.upscale.method: midus, or memory_layers); set it to 0"
        )
    for label, branch in branches.items():
        rows = branch.values.weight.shape[0]
        if settings.trainable_slots > rows:
            raise ValueError(
                f"model.sparse_memory.trainable_slots={settings.trainable_slots}: the memory of block {label} "
                f"has {rows} value rows; choose at most {rows}"
            )
    return branches


def _batches(blocks: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """Model inputs (rows without their last token) in batches of `batch_size`."""
    inputs = blocks[:, :-1]
    return [inputs[start : start + batch_size].to(device) for start in range(0, len(inputs), batch_size)]


def choose_rows(
    model: nn.Module, settings: SparseMemoryConfig, data: object, device: torch.device
) -> dict[str, torch.Tensor]:
    """The rows that train, by memory block label, ranked on the reads of `data`'s new and background text."""
    _memories(model, settings)
    population_blocks = getattr(data, "population_blocks", None)
    if population_blocks is None:
        raise ValueError("model.sparse_memory counts memory reads on the data's own text; use the kit's data module")
    batch_size = settings.count_batch_size or data.settings["batch_size"]
    count = settings.count_batches * batch_size
    new = population_blocks("new", count)
    background = population_blocks("background", count)
    if settings.ranking == "tfidf" and background is None:
        raise ValueError(
            "model.sparse_memory.ranking=tfidf weighs the new text's reads against background text, the base's own "
            "documents: set data.embedded.replay_seed (with data.source: embedded), or ranking: frequency"
        )
    background_batches = _batches(background, batch_size, device) if background is not None else []
    reads = count_row_reads(model, _batches(new, batch_size, device), background_batches)
    chosen = {}
    for label, counted in reads.items():
        rows = top_rows(row_scores(counted, settings.ranking), settings.trainable_slots)
        chosen[label] = rows.cpu()
        everywhere = int((counted.background_batches == counted.n_background).sum())
        log.info(
            "model.sparse_memory: block %s: %d of %d value rows train (%s over %d new and %d background batches of "
            "%d blocks); the new text read %d of them; %d rows are read by every background batch",
            label, len(rows), counted.new.numel(), settings.ranking, -(-len(new) // batch_size), counted.n_background,
            batch_size, int((counted.new[rows] > 0).sum()), everywhere,
        )
    return chosen


def make_sparse(model: nn.Module, settings: SparseMemoryConfig, rows: dict[str, torch.Tensor]) -> None:
    """Put a `SparseRowValues` training `rows[label]` in place of each memory's value table (again, when it
    already is one: the table is merged first), and freeze the rest when ``freeze_rest``."""
    branches = _memories(model, settings)
    if set(rows) != set(branches):
        raise ValueError(
            f"model.sparse_memory: trainable rows are given for memory blocks {sorted(rows)}, the model's memory "
            f"blocks are {sorted(branches)}"
        )
    for label, branch in branches.items():
        chosen = torch.as_tensor(rows[label], dtype=torch.long)
        if chosen.numel() != settings.trainable_slots:
            raise ValueError(
                f"model.sparse_memory.trainable_slots={settings.trainable_slots}, but the checkpoint's memory "
                f"block {label} trains {chosen.numel()} rows; resume with the trainable_slots it was trained with"
            )
        with torch.no_grad():
            table = branch.values.weight.detach()
        branch.values = SparseRowValues(table, chosen.to(table.device))
    if settings.freeze_rest:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for branch in branches.values():
            branch.values.trainable.requires_grad_(True)


def sparse_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """The rows each sparse value table trains, by memory block label (empty when none is sparse)."""
    return {
        label: branch.values.trainable_rows.cpu()
        for label, branch in memory_branches_by_block(model).items()
        if isinstance(branch.values, SparseRowValues)
    }


def saved_frozen_parameter_names(model: nn.Module) -> list[str]:
    """`frozen_parameter_names` as the saved, ordinary model names them: a sparse table's frozen rows
    stand for its whole table (``…values.weight``), which a rebuilt model freezes before it is made
    sparse again; its trainable rows are no parameter of that model."""
    renamed = {
        f"{name}.frozen": f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, SparseRowValues)
    }
    return [renamed.get(name, name) for name in frozen_parameter_names(model)]
