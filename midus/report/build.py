"""``python -m midus report runs/<experiment>``: report.md with the table and plots of an experiment.

Reads only the files inside the experiment folder, so it works on a folder whose arms ran on
other machines and were copied in: each arm's TensorBoard event files, ``summary.json`` (see
`midus.run_files`) and ``hparams.yaml``. An arm is every direct subfolder holding
``events.out.tfevents.*`` files (``runs/<experiment>/<arm>/``, or ``version_0/`` of a plain
run); the folder itself counts as one arm, named after it, when it holds event files directly
(`midus.report.arms`). Several event files of one arm (a resumed run, a later ``validate``)
are merged by step, the later one winning a step logged twice.

Writes ``report.md`` (the summary table of `midus.report.table` plus best val loss and
tokens trained, the plots, and where each arm's numbers came from) and two PNGs next to it:
``val_loss_vs_tokens.png`` (validation loss against training tokens, all arms; tokens, not
steps, since arms can differ in batch size) and ``val_ppl_vs_added_params.png`` (final
validation perplexity against parameters added by the up-scaling, one labelled point per arm).
An arm without ``summary.json`` (crashed, still running) gets its row from its event files.

A seeded ablation's ``<arm>/seed<k>/`` runs are drawn per arm: the mean over seeds with a band
from the lowest to the highest seed (loss curve) or an error bar (perplexity point); the table
adds each metric's mean and 95 % t-interval over seeds and, against each reference arm the
ablation recorded in ``ablation.json`` (or the one ``--reference`` names), the paired
differences with their verdicts (`midus.report.seed_table`). The bits-above-control columns
subtract the recorded control arm's bits (default: the first recorded reference), and a caption
says how the runs were timed (`midus.report.table`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from midus.report.arms import Arm, NoRunError, collect_arms, tokens_at
from midus.report.plots import loss_curves, plot_val_loss, plot_val_ppl, ppl_points
from midus.report.seed_bands import arms_of, seed_bands
from midus.report.seed_table import seed_sections
from midus.report.table import COLUMNS, ArmRow, Column, markdown_table, timing_note, with_control
from midus.run_files import ABLATION_RECORD, Control, value_at

LOSS_PNG = "val_loss_vs_tokens.png"
PPL_PNG = "val_ppl_vs_added_params.png"


def report_columns() -> list[Column]:
    """`COLUMNS` with tokens trained (before tokens/s)."""
    tokens = Column("tokens trained", "train_tokens", lambda r: value_at(r, "train.tokens"), "{:,.0f}")
    columns: list[Column] = []
    for column in COLUMNS:
        columns += [tokens] if column.name == "train_tokens_per_sec" else []
        columns += [column]
    return columns + [c for c in (tokens,) if c not in columns]


def render_markdown(experiment: str, arms: list[Arm], curve_notes: list[str], ppl_notes: list[str],
                    loss_png: str = LOSS_PNG, ppl_png: str = PPL_PNG, references: Sequence[str] = (),
                    control: Control | None = None) -> str:
    """The text of report.md (images linked relative to it); seeded runs get the means over seeds
    with their intervals and the paired verdicts against each of `references`; `control` is the
    arm the bits-above-control columns subtract."""
    rows = with_control([ArmRow(arm.arm or arm.name, arm.status, arm.record, arm.seed) for arm in arms], control)
    table = markdown_table(rows, report_columns())
    if any(row.seed is not None for row in rows):
        table = seed_sections(rows, report_columns(), references, control) + "\n## Every run\n\n" + table
    timing = timing_note(rows)
    lines = [f"# Report: {experiment}", "", *([timing] if timing else []), table,
             "## Validation loss against training tokens", "",
             f"![validation loss against training tokens]({loss_png})", ""]
    lines += [f"- {note}" for note in curve_notes] + ([""] if curve_notes else [])
    lines += ["## Final validation perplexity against added parameters", "",
              f"![final validation perplexity against added parameters]({ppl_png})", ""]
    lines += [f"- {note}" for note in ppl_notes] + ([""] if ppl_notes else [])
    lines += ["## Where the numbers come from", ""]
    for arm in arms:
        points = len(arm.scalars.get("val/loss", []))
        curve = f"curve: {points} val/loss point(s) from {arm.event_files} event file(s)"
        curve += f", tokens from {tokens_at(arm, [0])[1]}" if points else ""
        lines.append(f"- `{arm.name}`: {'; '.join([*arm.sources, curve])}.")
    return "\n".join(lines) + "\n"


def write_report(experiment_dir: Path, out: Path | None = None, reference: str | None = None) -> Path:
    """Write report.md (default ``experiment_dir/report.md``) and its two PNGs next to it; returns its path.

    `reference` (default: every reference arm recorded in ``ablation.json``) is the arm seeded
    runs are paired against; the control arm is the recorded one. Everything is read before
    anything is written: bad input raises and leaves no file behind.
    """
    experiment_dir = Path(experiment_dir)
    arms = collect_arms(experiment_dir)
    experiment = experiment_dir.resolve().name
    recorded_references, control = recorded_layout(experiment_dir)
    references = [reference] if reference else recorded_references
    for name in references:
        if name not in {arm.arm for arm in arms}:
            raise NoRunError(f"--reference {name!r}: no such arm in {experiment_dir}; "
                             f"the arms are: {', '.join(dict.fromkeys(arm.arm for arm in arms))}")
    curves, xlabel, curve_notes = loss_curves(arms)
    # A seed still running or crashed is listed in the table, but enters no band (as no mean).
    unfinished = [arm.name for arm in arms if arm.seed is not None and arm.status != "ok"]
    bands, band_notes = seed_bands(curves, [arm for arm in arms if arm.name not in unfinished])
    band_notes += [f"`{name}` has no summary.json (running or crashed): not in its arm's band or mean."
                   for name in unfinished]
    points, ppl_label, ppl_notes = ppl_points(arms)
    points, spread = mean_points(points, arms)
    out = Path(out) if out is not None else experiment_dir / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_val_loss(bands, xlabel, f"{experiment}: validation loss", out.parent / LOSS_PNG)
    plot_val_ppl(points, ppl_label, f"{experiment}: final validation perplexity", out.parent / PPL_PNG, spread)
    text = render_markdown(experiment, arms, curve_notes + band_notes, ppl_notes, references=references,
                           control=control)
    out.write_text(text, encoding="utf-8")
    return out


def recorded_layout(experiment_dir: Path) -> tuple[list[str], Control | None]:
    """The reference arms and the control arm (or arm → its control) the ablation runner recorded in ``ablation.json``
    (([], None) without the file). A file written before the control was recorded gives its first
    reference as the control (the runner's default)."""
    try:
        layout = json.loads((experiment_dir / ABLATION_RECORD).read_text(encoding="utf-8"))
        references = layout.get("references") or ([layout["reference"]] if layout.get("reference") else [])
        return list(references), layout.get("control", references[0] if references else None)
    except (OSError, ValueError, AttributeError, TypeError):
        return [], None


def mean_points(
    points: dict[str, tuple[float, float]], runs: list[Arm]
) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float, int]]]:
    """Per-run (x, ppl) points folded per arm: an arm of several seeds becomes its mean point,
    with (lowest, highest, seeds) in the second mapping."""
    folded, spread = {}, {}
    for arm, members in arms_of(runs).items():
        mine = [points[run.name] for run in members if run.name in points]
        if len(mine) == 1 and members[0].seed is None:
            folded[arm] = mine[0]
        elif mine:
            ppls = [ppl for _, ppl in mine]
            folded[arm] = (sum(x for x, _ in mine) / len(mine), sum(ppls) / len(ppls))
            spread[arm] = (min(ppls), max(ppls), len(mine))
    return folded, spread


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m midus report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", type=Path, help="the experiment folder, e.g. runs/dus_vs_midus")
    parser.add_argument("--out", type=Path, default=None,
                        help="path of the report (default: <experiment_dir>/report.md); the PNGs go next to it")
    parser.add_argument("--reference", default=None,
                        help="seeded runs: the arm every other arm is paired against (default: each of the "
                             "ablation's references, from <experiment_dir>/ablation.json)")
    options = parser.parse_args(sys.argv[1:] if args is None else args)
    try:
        path = write_report(options.experiment_dir, options.out, options.reference)
    except (FileNotFoundError, NoRunError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path}, {path.parent / LOSS_PNG} and {path.parent / PPL_PNG}")

