"""The tables of a seeded ablation: per arm, each metric's mean and 95 % interval over seeds;
per arm against the reference arm, the paired difference and a verdict (`midus.report.intervals`).

Only finished runs count (status "ok": a readable ``summary.json``; not a failed, running or
crashed run, which ``report`` would otherwise read from its event files); a metric missing from a run (e.g. recall with
the probe off) is averaged over the runs that have it, and the cell says how many when that is
fewer than the arm's runs.

The paired tables list the differences first, then the costs paired as ratios (the efficiency
columns: trainable parameters, optimizer state, step time, latencies, peak memory), so the table
against interleaved DUS reads as the paper's efficiency claims with their intervals.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from midus.report.intervals import (
    CONFIDENCE,
    Interval,
    mean_interval,
    paired_difference,
    paired_ratio,
    ratio_verdict,
    verdict,
)
from midus.report.table import ArmRow, Column
from midus.run_files import Control

INTERVAL_NOTE = (
    f"Cells: mean ± half-width of the {CONFIDENCE:.0%} Student-t confidence interval over seeds "
    "(t quantile with n - 1 degrees of freedom, sample standard deviation); n = seeds with a summary."
)
PAIRED_NOTE = (
    "Cells: mean of (arm - reference) over the seeds both ran, [its {:.0%} Student-t interval], "
    "and the verdict: better / worse when the interval excludes 0, else not distinguishable. "
    "Costs (× columns) are the mean of arm / reference per seed, judged against 1."
).format(CONFIDENCE)


def _numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def values_by_seed(rows: list[ArmRow], arm: str, column: Column) -> dict[int, float]:
    """The arm's numeric values of `column`, by seed, from its runs with a summary."""
    found = {}
    for row in rows:
        if row.arm == arm and row.status == "ok" and row.record is not None and row.seed is not None:
            value = column.value(row)
            if _numeric(value):
                found[row.seed] = float(value)
    return found


def _fmt(column: Column, value: float) -> str:
    # Counts and integer-like columns ("{:,}", "{}") get one decimal once averaged.
    pattern = column.fmt if any(spec in column.fmt for spec in ("f}", "%}")) else "{:,.1f}"
    return pattern.format(value)


def _mean_cell(column: Column, interval: Interval, runs: int) -> str:
    text = _fmt(column, interval.mean)
    if interval.half_width is not None and interval.half_width > 0:
        text += " ± " + _fmt(column, interval.half_width).lstrip("+")
    return text + (f" (n={interval.n})" if interval.n < runs else "")


def _arms(rows: list[ArmRow]) -> list[str]:
    return list(dict.fromkeys(row.arm for row in rows))


def mean_table(rows: list[ArmRow], columns: list[Column]) -> str:
    """Markdown: one line per arm, its number of seeds with a summary, and each column's mean ± interval."""
    lines = [
        "| " + " | ".join(["arm", "seeds", *(c.title for c in columns)]) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for arm in _arms(rows):
        runs = [row for row in rows if row.arm == arm and row.status == "ok" and row.record is not None]
        cells = [arm, str(len(runs))]
        for column in columns:
            values = values_by_seed(rows, arm, column)
            if values and len(set(values.values())) == 1 and len(values) == len(runs):
                cells.append(column.fmt.format(column.value(runs[0])))  # the same in every seed (sizes)
            elif values:
                cells.append(_mean_cell(column, mean_interval(list(values.values())), len(runs)))
            else:  # a text column (the same in every run) or nothing
                texts = {str(column.value(row)) for row in runs if column.value(row) is not None}
                cells.append(" / ".join(sorted(texts)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _paired_title(column: Column) -> str:
    return f"× {column.title}" if column.paired == "ratio" else f"Δ {column.title}"


def _ratio_cell(ratio: Interval, better: str) -> str:
    text = f"{ratio.mean:.2f}×"
    if ratio.low is not None:
        text += f" [{ratio.low:.2f}, {ratio.high:.2f}]"
    return f"{text} {ratio_verdict(ratio, better)}"


def paired_table(rows: list[ArmRow], columns: list[Column], reference: str) -> str:
    """Markdown: for every arm but `reference`, each directed column's paired difference and verdict:
    the differences first, then the ratios (costs)."""
    directed = [c for c in columns if c.better is not None and c.paired != "ratio"]
    directed += [c for c in columns if c.better is not None and c.paired == "ratio"]
    lines = [
        "| " + " | ".join(["arm", "common seeds", *(_paired_title(c) for c in directed)]) + " |",
        "|" + "---|" * (len(directed) + 2),
    ]
    for arm in _arms(rows):
        if arm == reference:
            continue
        cells, common = [arm], set()
        for column in directed:
            mine, theirs = values_by_seed(rows, arm, column), values_by_seed(rows, reference, column)
            common |= set(mine) & set(theirs)
            if column.paired == "ratio":
                ratio = paired_ratio(mine, theirs)
                cells.append("" if ratio is None else _ratio_cell(ratio, column.better))
                continue
            difference = paired_difference(mine, theirs)
            if difference is None:
                cells.append("")
                continue
            text = _fmt(column, difference.mean)
            if difference.low is not None:
                text += f" [{_fmt(column, difference.low)}, {_fmt(column, difference.high)}]"
            cells.append(f"{text} {verdict(difference, column.better)}")
        cells.insert(1, str(len(common)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def control_note(control: Control | None) -> str:
    """The caption line naming the control arm(s) the "bits above control" columns subtract."""
    if control is None:
        return "No control arm (ablation.control or ablation.reference): the bits-above-control columns are empty.\n"
    if isinstance(control, str):
        return (f"Control: {control} (bits above control = a run's knowledge bits - {control}'s of the same seed, "
                "divided by the run's added or trainable parameters).\n")
    grouped: dict[str, list[str]] = {}
    for arm, its_control in control.items():
        grouped.setdefault(its_control, []).append(arm)
    listed = "; ".join(f"{name} for {', '.join(arms)}" for name, arms in grouped.items())
    return (f"Controls: {listed} (bits above control = a run's knowledge bits - its control's of the same seed, "
            "divided by the run's added or trainable parameters; other arms have no control).\n")


def seed_sections(
    rows: list[ArmRow], columns: list[Column], references: Sequence[str] = (), control: Control | None = None
) -> str:
    """The Markdown sections of a seeded ablation: means over seeds, then the paired differences
    to each of the `references` arms; `rows` carry their `control` records (`with_control`)."""
    seeds = sorted({row.seed for row in rows if row.seed is not None})
    notes = f"{INTERVAL_NOTE}\n\n{control_note(control)}"
    text = f"## Mean over seeds {', '.join(map(str, seeds))}\n\n{notes}\n{mean_table(rows, columns)}"
    for arm in references:
        text += f"\n## Paired differences to {arm}\n\n{PAIRED_NOTE}\n\n{paired_table(rows, columns, arm)}"
    return text


def write_seed_csv(path: Path, rows: list[ArmRow], columns: list[Column]) -> None:
    """One line per arm: for every numeric column its mean, interval bounds and n (``<name>_mean`` ...)."""
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        parts = ("mean", "ci95_low", "ci95_high", "n")
        writer.writerow(["arm", *(f"{c.name}_{part}" for c in columns for part in parts)])
        for arm in _arms(rows):
            line: list[object] = [arm]
            for column in columns:
                values = values_by_seed(rows, arm, column)
                if not values:
                    line += ["", "", "", 0]
                    continue
                interval = mean_interval(list(values.values()))
                bounds = ["" if b is None else b for b in (interval.low, interval.high)]
                line += [interval.mean, *bounds, interval.n]
            writer.writerow(line)
