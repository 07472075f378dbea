"""Drawing shared by the analysis commands, and writing a figure where people look for it.

Figures are bare `matplotlib.figure.Figure` objects (no pyplot state, so any backend and
any thread). `write_figure` saves one as a PNG and files the same pixels as a TensorBoard
image in the run directory, under the checkpoint's training step, so the analysis sits
beside the run's training curves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

DPI = 110
ANNOTATE_MAX_COLUMNS = 16
"""Heatmaps wider than this get no per-cell numbers: they would overlap (the CSV has them)."""


def new_figure(width: float, height: float) -> Figure:
    """A blank figure of `width` × `height` inches with constrained layout."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def decimal_format(values: np.ndarray, signed: bool = False) -> str:
    """A fixed-point format showing the largest |value| of `values` to 3 significant digits.

    One number of decimals for every cell, so a column of annotations lines up and compares.
    """
    finite = np.abs(np.asarray(values, dtype=float))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    decimals = 2 - math.floor(math.log10(finite.max())) if finite.size else 2
    return "{:" + ("+" if signed else "") + f".{min(max(decimals, 0), 6)}f" + "}"


def draw_heatmap(
    ax: Axes,
    values: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str,
    colorbar_label: str,
    cmap: str = "viridis",
    centred: bool = False,
    value_format: str = "{:.3g}",
) -> None:
    """rows × columns `values` as coloured cells with a colour bar; NaN cells stay blank.

    `centred` uses a diverging map with white at zero, for signed values (a loss change)
    whose sign matters more than their size. Cells are annotated with their values unless
    there are more than `ANNOTATE_MAX_COLUMNS` columns.
    """
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    norm = None
    if centred:
        reach = float(np.abs(finite).max()) if finite.size else 0.0
        reach = reach or 1.0  # all zero: any symmetric range shows it as white
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-reach, vmax=reach)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label=colorbar_label, shrink=0.9)
    # At most ~16 labelled columns, so labels never overlap however many heads there are.
    step = math.ceil(len(column_labels) / ANNOTATE_MAX_COLUMNS)
    ax.set_xticks(range(0, len(column_labels), step), list(column_labels)[::step])
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_title(title)
    if values.shape[1] > ANNOTATE_MAX_COLUMNS:
        return
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            value = values[row, column]
            if not math.isfinite(value):
                continue
            # Dark text on light cells and light text on dark ones, judged by the cell's own colour.
            red, green, blue, _ = image.cmap(image.norm(value))
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
            ax.text(column, row, value_format.format(value), ha="center", va="center",
                    fontsize="small", color="black" if light else "white")


def draw_count_histograms(
    ax: Axes,
    histograms: Sequence[tuple[np.ndarray, np.ndarray, str]],
    title: str,
    xlabel: str,
    ylabel: str,
    legend: bool = True,
) -> None:
    """Overlaid step histograms, each ``(edges, counts, label)``, on a log-scaled count axis.

    The x axis is linear for small ranges and symmetric-log (linear below 1) otherwise, so a
    bin [0, 1) of zeros stays visible next to a long tail.
    """
    top, right = 1.0, 0.0
    for index, (edges, counts, label) in enumerate(histograms):
        ax.stairs(counts, edges, label=label, color=f"C{index % 10}", linewidth=1.3, baseline=None)
        top, right = max(top, float(np.max(counts, initial=0))), max(right, float(edges[-1]))
    if right > 64:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yscale("log")
    ax.set_ylim(0.7, top * 1.6)  # a bin holding one slot stays above the bottom edge
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, which="both")
    if legend and histograms:
        ax.legend(fontsize="x-small")


def figure_pixels(fig: Figure) -> np.ndarray:
    """The rendered figure as an (height, width, 3) uint8 RGB array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_figure(fig: Figure, png_path: Path, run_dir: Path, tag: str, step: int) -> None:
    """Save `fig` as `png_path` and as TensorBoard image `tag` at `step` in `run_dir`."""
    from torch.utils.tensorboard import SummaryWriter

    png_path.parent.mkdir(parents=True, exist_ok=True)
    pixels = figure_pixels(fig)
    fig.savefig(png_path, dpi=DPI)
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
    finally:
        writer.close()
