"""Seeded runs drawn as one curve per arm: the mean over seeds with a band from the lowest to
the highest seed, at the validation steps every seed logged."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from midus.report.arms import Arm


@dataclass
class Band:
    """An arm's curve over its seeds: x (mean over seeds), mean, lowest and highest value, seeds."""

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    seeds: int


def arms_of(runs: list[Arm]) -> dict[str, list[Arm]]:
    """The runs grouped by arm, in run order."""
    groups: dict[str, list[Arm]] = {}
    for run in runs:
        groups.setdefault(run.arm or run.name, []).append(run)
    return groups


def seed_bands(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], runs: list[Arm]
) -> tuple[dict[str, Band], list[str]]:
    """Per arm, the `Band` of its runs' curves (`curves` is per run name), and notes on what was left out.

    Only the x positions of the arm's first run that every run has (the same validation steps)
    count: a seed that stopped early shortens the band instead of bending the mean.
    """
    bands, notes = {}, []
    for arm, members in arms_of(runs).items():
        drawn = [run.name for run in members if run.name in curves]
        if not drawn:
            continue
        index = [np.arange(len(curves[name][0])) for name in drawn]
        length = min(len(i) for i in index)
        if length < max(len(i) for i in index):
            notes.append(f"`{arm}`: seeds logged different numbers of validations; the band covers the first {length}.")
        xs = np.stack([curves[name][0][:length] for name in drawn])
        ys = np.stack([curves[name][1][:length] for name in drawn])
        bands[arm] = Band(xs.mean(0), ys.mean(0), ys.min(0), ys.max(0), len(drawn))
    return bands, notes
