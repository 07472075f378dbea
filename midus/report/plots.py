"""The PNG plots of `midus.report.build`: what each shows (`loss_curves`, `ppl_points`) and their drawing.

Drawn on bare `Figure` objects: no pyplot state, whatever the backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from midus.report.arms import Arm, tokens_at
from midus.report.seed_bands import Band
from midus.run_files import value_at

MARKERS = "osD^vP*Xh<>p"


def loss_curves(arms: list[Arm]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str, list[str]]:
    """Per arm (x, val loss) for the loss plot, the x-axis label, and notes on arms left out.

    x is training tokens; arms whose tokens are unknown are left off the plot (noted), unless no
    arm has them: then every arm is plotted against the optimizer step.
    """
    series = {arm.name: arm.scalars.get("val/loss", []) for arm in arms}
    notes = [f"`{name}` logged no val/loss: not plotted." for name, points in series.items() if not points]
    tokens = {arm.name: tokens_at(arm, [s for s, _ in series[arm.name]]) for arm in arms if series[arm.name]}
    if tokens and all(x is None for x, _ in tokens.values()):
        notes.append("No arm logged training tokens: the loss is plotted against the optimizer step.")
        curves = {name: (np.array([s for s, _ in series[name]], float), np.array([v for _, v in series[name]]))
                  for name in tokens}
        return curves, "optimizer step (training tokens unknown)", notes
    notes += [f"`{name}` left off the loss plot: {basis}." for name, (x, basis) in tokens.items() if x is None]
    curves = {name: (x, np.array([v for _, v in series[name]])) for name, (x, _) in tokens.items() if x is not None}
    return curves, "training tokens", notes


def ppl_points(arms: list[Arm]) -> tuple[dict[str, tuple[float, float]], str, list[str]]:
    """Per arm (added params, final val ppl), the x-axis label, and notes on arms left out.

    When no arm added parameters (a from-scratch ablation, or records older than ``params.added``)
    the x-axis is the total parameter count instead.
    """
    key, label, notes = "params.added", "parameters added by the up-scaling", []
    if not any(value_at(arm.record, key) for arm in arms):
        key, label = "params.total", "total parameters (no arm added any)"
        notes.append("No arm added parameters (no up-scaling, or records without params.added): "
                     "plotted against the total parameter count.")
    points = {}
    for arm in arms:
        x, ppl = value_at(arm.record, key), value_at(arm.record, "val.ppl")
        if x is None or ppl is None or not np.isfinite(ppl):
            missing = f"no {key}" if x is None else f"val.ppl is {ppl}"
            notes.append(f"`{arm.name}` left off the perplexity plot: {missing}.")
        else:
            points[arm.name] = (float(x), float(ppl))
    return points, label, notes


def _figure(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_val_loss(bands: dict[str, Band], xlabel: str, title: str, path: Path) -> None:
    """One line per arm: validation loss (y) against `xlabel` (x); an arm of several seeds is its
    mean over seeds with a shaded band from the lowest to the highest seed.

    Left, every validation (the untrained step-0 point included); right, when there is one,
    the same curves without x = 0, on a y-range the untrained loss no longer flattens.
    """
    trained = {arm: band.x > 0 for arm, band in bands.items() if np.any(band.x > 0)}
    fig = Figure(figsize=(12 if trained else 8, 5), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2 if trained else 1, squeeze=False)[0]
    fig.suptitle(title)
    subtitles = ["every validation", "untrained step-0 point left out (zoom)"]
    for ax, subtitle, zoom in zip(axes, subtitles, [False, True]):
        for index, (arm, band) in enumerate(bands.items()):
            keep = trained.get(arm) if zoom else np.ones(len(band.x), bool)
            if keep is None:
                continue
            color = f"C{index % 10}"
            label = arm if band.seeds == 1 else f"{arm} (mean of {band.seeds} seeds, band: min-max)"
            ax.plot(band.x[keep], band.mean[keep], marker=MARKERS[index % len(MARKERS)], markersize=4,
                    linewidth=1.5, label=label, color=color)
            if band.seeds > 1:
                ax.fill_between(band.x[keep], band.low[keep], band.high[keep], color=color, alpha=0.2, linewidth=0)
        ax.set_title(subtitle if trained else "")
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats per token)")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if bands:
        axes[0].legend(title="arm", fontsize="small")
    else:
        _nothing(axes[0], "no arm logged val/loss")
    fig.savefig(path)


def plot_val_ppl(points: dict[str, tuple[float, float]], xlabel: str, title: str, path: Path,
                 spread: dict[str, tuple[float, float, int]] | None = None) -> None:
    """One labelled point per arm: final validation perplexity (log y) against a parameter count.

    `spread` gives arms of several seeds (lowest, highest, seeds): their point is the mean over
    seeds, with an error bar from the lowest to the highest seed.
    """
    fig, ax = _figure(title)
    spread = spread or {}
    for index, (arm, (params, ppl)) in enumerate(points.items()):
        color = f"C{index % 10}"
        ax.scatter([params], [ppl], s=50, marker=MARKERS[index % len(MARKERS)], color=color, zorder=3)
        label = arm
        if arm in spread:
            low, high, seeds = spread[arm]
            ax.errorbar([params], [ppl], yerr=[[ppl - low], [high - ppl]], color=color, capsize=4, zorder=2)
            label = f"{arm} ({seeds} seeds)"
        ax.annotate(label, (params, ppl), xytext=(6, 4), textcoords="offset points", fontsize="small", color=color)
    if points:
        ppls = [ppl for _, ppl in points.values()]
        if max(ppls) / min(ppls) > 3:  # perplexities of different magnitudes: log scale
            ax.set_yscale("log")
        xs = [params for params, _ in points.values()]
        span = (max(xs) - min(xs)) or max(abs(max(xs)), 1.0)
        ax.set_xlim(min(xs) - 0.1 * span, max(xs) + 0.25 * span)  # room for the labels
        low, high = min(ppls), max(ppls)
        pad = (high - low) * 0.15 or high * 0.05
        ax.set_ylim(max(low - pad, low * 0.8), high + pad)
    else:
        _nothing(ax, "no arm has both a val perplexity and a parameter count")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation perplexity")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    fig.savefig(path)
