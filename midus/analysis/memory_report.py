"""``python -m midus memory-usage``: how evenly each memory head reads its product-key slots.

Runs the checkpoint over the validation split with `SlotUsage` trackers on every
`ProductKeys` module (the same counters validation logs as ``memory/<block>/<head>/...``)
and reports, per memory block and head, the slot usage, the KL divergence of the slot-access
distribution from uniform, the retrieval-weight entropy, and a histogram of how many times
each slot was read. The module also holds what every memory analysis needs first: the
memory modules of a checkpoint (`memory_keys_of`) and its validation batches.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from midus.analysis.checkpoint_run import CheckpointRun, analysis_parser, fail_cleanly, load_checkpoint_run
from midus.analysis.figures import draw_count_histograms, draw_heatmap, new_figure, write_figure
from midus.data.text_data import TextData
from midus.model.retrieval.product_keys import ProductKeys
from midus.model.retrieval.slot_usage import SlotUsage, SlotUsageTracker, product_key_modules

DESCRIPTION = """Slot usage of every memory head of a checkpoint, over the validation split.

For every product-key memory (labelled by block index) and head, the validation tokens are
run through the model and each slot read counted (k reads per token and head). Reported:
usage, the fraction of the N slots read at least once; kl_uniform, the KL divergence in
nats of the slot-access distribution from uniform (0 = every slot read equally often,
log N = one slot takes every read); entropy, the mean entropy of one query's k retrieval
weights (log k = uniform); never_read and max_reads. Writes memory_usage.csv and
memory_usage.png (heatmaps of the three statistics, and per block a histogram of how many
times each slot was read, heads overlaid, log count axis) to --out_dir, and the figure as
TensorBoard image analysis/memory_usage in the run directory."""

TAG = "analysis/memory_usage"
FIELDS = ["block", "head", "slots", "tokens", "reads", "usage", "kl_uniform", "entropy", "never_read", "max_reads"]


def memory_keys_of(run: CheckpointRun) -> dict[str, ProductKeys]:
    """The `ProductKeys` module of every memory block of `run`'s model, by block index.

    Raises:
        ValueError: the checkpoint has no product-key memory to analyse.
    """
    keys = product_key_modules(run.model)
    if not keys:
        raise ValueError(
            f"--ckpt_path: {str(run.checkpoint_path)!r} has no memory blocks (no product-key memory in any "
            "block); give a checkpoint of a model with memory_layers or a pkm / multihead_pkm / hml branch"
        )
    return keys


def validation_batches(
    data: TextData, max_batches: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of the first `max_batches` validation batches (0: all), as training scores them."""
    for index, batch in enumerate(data.val_dataloader()):
        if max_batches and index >= max_batches:
            break
        ids = batch["input_ids"].to(device)
        yield ids[:, :-1], ids[:, 1:]


@torch.no_grad()
def collect_slot_usage(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[dict[str, SlotUsage], int]:
    """Slot-read counters of every memory block over `batches`, and the number of tokens read."""
    tokens = 0
    with SlotUsageTracker(model) as tracker:
        for inputs, _ in batches:
            model(inputs)
            tokens += inputs.numel()
    usages = tracker.usages
    if tokens == 0:
        raise ValueError("data: the validation split has no batches to analyse")
    return usages, tokens


def access_histogram(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How many slots were read how often: `counts` (N,) reads per slot → (edges, slots per bin).

    One bin per read count while counts stay below 64; beyond that about 40 geometric bins,
    always with [0, 1) on its own so the never-read slots are a bin of their own.
    """
    top = int(counts.max(initial=0))
    if top < 64:
        edges = np.arange(top + 2, dtype=float)
    else:
        edges = np.unique(np.concatenate(([0.0, 1.0], np.round(np.geomspace(1, top + 1, 40)))))
    slots_per_bin, _ = np.histogram(counts, bins=edges)
    return edges, slots_per_bin


def usage_rows(usages: dict[str, SlotUsage], tokens: int) -> list[dict[str, float | int | str]]:
    """One row per block and head with the `FIELDS` of memory_usage.csv."""
    rows: list[dict[str, float | int | str]] = []
    for label, usage in usages.items():
        stats = usage.per_head()
        counts = usage.counts.view(usage.n_heads, usage.n_slots)
        for head in range(usage.n_heads):
            rows.append({
                "block": label, "head": head, "slots": usage.n_slots, "tokens": tokens,
                "reads": int(counts[head].sum()),
                "usage": float(stats["usage"][head]),
                "kl_uniform": float(stats["kl_uniform"][head]),
                "entropy": float(stats["entropy"][head]),
                "never_read": int((counts[head] == 0).sum()),
                "max_reads": int(counts[head].max()),
            })
    return rows


def _grid(rows: list[dict], field: str, labels: list[str], n_heads: int) -> np.ndarray:
    values = np.full((len(labels), n_heads), np.nan)  # blocks may differ in heads: blank cells
    for row in rows:
        values[labels.index(row["block"]), row["head"]] = row[field]
    return values


def draw_memory_usage(usages: dict[str, SlotUsage], keys: dict[str, ProductKeys], tokens: int) -> Figure:
    """Heatmaps (blocks × heads) of usage, KL from uniform and entropy; per block a slot-read histogram."""
    rows = usage_rows(usages, tokens)
    labels = list(usages)
    n_heads = max(usage.n_heads for usage in usages.values())
    histogram_rows = math.ceil(len(labels) / 2)
    heatmap_height = 1.3 + 0.35 * len(labels)
    fig = new_figure(15, heatmap_height + 3.2 * histogram_rows)
    grid = fig.add_gridspec(1 + histogram_rows, 6, height_ratios=[heatmap_height] + [3.2] * histogram_rows)
    block_names = [f"block {label}" for label in labels]
    head_names = [str(head) for head in range(n_heads)]
    slots = sorted({usage.n_slots for usage in usages.values()})
    topks = sorted({keys[label].topk for label in labels})
    panels = [
        ("usage", "slot usage\n(share of the N slots read ≥ 1×)", "{:.0%}"),
        ("kl_uniform", f"KL(slot reads ‖ uniform), nats\n(one slot only: log N = {math.log(slots[-1]):.2f})", "{:.2f}"),
        ("entropy", f"retrieval-weight entropy, nats\n(uniform over k: log k = {math.log(topks[-1]):.2f})", "{:.2f}"),
    ]
    for index, (field, title, value_format) in enumerate(panels):
        ax = fig.add_subplot(grid[0, 2 * index:2 * index + 2])
        draw_heatmap(ax, _grid(rows, field, labels, n_heads), block_names, head_names, title, "",
                     cmap="viridis", value_format=value_format)
        ax.set_xlabel("head")
    for index, label in enumerate(labels):
        usage = usages[label]
        counts = usage.counts.view(usage.n_heads, usage.n_slots).cpu().numpy()
        histograms = []
        for head in range(usage.n_heads):
            edges, slots_per_bin = access_histogram(counts[head])
            histograms.append((edges, slots_per_bin, f"head {head}: {int((counts[head] == 0).sum())} never read"))
        never = (counts == 0).sum(-1)
        ax = fig.add_subplot(grid[1 + index // 2, 3 * (index % 2):3 * (index % 2) + 3])
        title = (f"block {label}: reads per slot ({tokens:,} tokens × k={keys[label].topk}, N={usage.n_slots:,}); "
                 f"never read: {never.min()}–{never.max()} slots")
        draw_count_histograms(ax, histograms, title, "times a slot was read", "slots",
                              legend=usage.n_heads <= 8)
    return fig


def build_parser():
    """The command's parser: the shared analysis options only."""
    return analysis_parser("memory-usage", DESCRIPTION)


def write_csv(rows: list[dict], path: Path, fields: list[str]) -> None:
    """`rows` as a CSV with header `fields`, floats at full precision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(args: list[str]) -> None:
    """``python -m midus memory-usage --ckpt_path <ckpt> [--out_dir DIR] [--max_batches N] ...``."""
    try:
        run = load_checkpoint_run(build_parser(), args)
        keys = memory_keys_of(run)
        device = next(run.model.parameters()).device
        usages, tokens = collect_slot_usage(run.model, validation_batches(run.data, run.args.max_batches, device))
    except (ValueError, FileNotFoundError) as error:
        fail_cleanly(error)
    rows = usage_rows(usages, tokens)
    csv_path, png_path = run.out_dir / "memory_usage.csv", run.out_dir / "memory_usage.png"
    write_csv(rows, csv_path, FIELDS)
    write_figure(draw_memory_usage(usages, keys, tokens), png_path, run.run_dir, TAG, run.step)
    print(f"memory usage of {run.checkpoint_path} over {tokens:,} validation tokens")
    print(
        f"{'block':>5} {'head':>4} {'usage':>7} {'kl_uniform':>10} {'entropy':>7} {'never_read':>10} {'max_reads':>9}"
    )
    for row in rows:
        print(
            f"{row['block']:>5} {row['head']:>4} {row['usage']:>7.1%} {row['kl_uniform']:>10.3f} "
            f"{row['entropy']:>7.3f} {row['never_read']:>10,} {row['max_reads']:>9,}"
        )
    print(f"wrote {csv_path} and {png_path}; TensorBoard image {TAG} in {run.run_dir}")
