"""``python -m midus report runs/<experiment>``: report.md with the table and plots of an experiment.

Reads only the files inside the experiment folder, so it works on a folder whose arms ran on
other machines and were copied in: each arm's TensorBoard event files, ``summary.json`` (see
`midus.run_files`) and ``hparams.yaml``. An arm is every direct subfolder holding
``events.out.tfevents.*`` files (``runs/<experiment>/<arm>/``, or ``version_0/`` of a plain
run); the folder itself counts as one arm, named after it, when it holds event files directly
(`midus.report.arms`). Several event files of one arm (a resumed run, a later ``validate``)
are merged by step, the later one winning a step logged twice.

Writes ``report.md`` (the summary table of `midus.ablation.table` plus best val loss and
tokens trained, the plots, and where each arm's numbers came from) and two PNGs next to it:
``val_loss_vs_tokens.png`` (validation loss against training tokens, all arms; tokens, not
steps, since arms can differ in batch size) and ``val_ppl_vs_added_params.png`` (final
validation perplexity against parameters added by the up-scaling, one labelled point per arm).
An arm without ``summary.json`` (crashed, still running) gets its row from its event files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from midus.ablation.table import COLUMNS, ArmRow, Column, markdown_table
from midus.report.arms import Arm, NoRunError, collect_arms, tokens_at
from midus.report.plots import loss_curves, plot_val_loss, plot_val_ppl, ppl_points
from midus.run_files import value_at

LOSS_PNG = "val_loss_vs_tokens.png"
PPL_PNG = "val_ppl_vs_added_params.png"


def report_columns() -> list[Column]:
    """`COLUMNS` with best val loss (after val ppl) and tokens trained (before tokens/s)."""
    best = Column("best val loss", "val_best_loss", lambda r: value_at(r, "val.best_loss"), "{:.3f}")
    tokens = Column("tokens trained", "train_tokens", lambda r: value_at(r, "train.tokens"), "{:,.0f}")
    columns: list[Column] = []
    for column in COLUMNS:
        columns += [tokens] if column.name == "train_tokens_per_sec" else []
        columns += [column] + ([best] if column.name == "val_ppl" else [])
    return columns + [c for c in (best, tokens) if c not in columns]


def render_markdown(experiment: str, arms: list[Arm], curve_notes: list[str], ppl_notes: list[str],
                    loss_png: str = LOSS_PNG, ppl_png: str = PPL_PNG) -> str:
    """The text of report.md (images linked relative to it)."""
    rows = [ArmRow(arm.name, arm.status, arm.record) for arm in arms]
    lines = [f"# Report: {experiment}", "", markdown_table(rows, report_columns()),
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


def write_report(experiment_dir: Path, out: Path | None = None) -> Path:
    """Write report.md (default ``experiment_dir/report.md``) and its two PNGs next to it; returns its path.

    Everything is read before anything is written: bad input raises and leaves no file behind.
    """
    experiment_dir = Path(experiment_dir)
    arms = collect_arms(experiment_dir)
    experiment = experiment_dir.resolve().name
    curves, xlabel, curve_notes = loss_curves(arms)
    points, ppl_label, ppl_notes = ppl_points(arms)
    out = Path(out) if out is not None else experiment_dir / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_val_loss(curves, xlabel, f"{experiment}: validation loss", out.parent / LOSS_PNG)
    plot_val_ppl(points, ppl_label, f"{experiment}: final validation perplexity", out.parent / PPL_PNG)
    out.write_text(render_markdown(experiment, arms, curve_notes, ppl_notes), encoding="utf-8")
    return out


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m midus report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", type=Path, help="the experiment folder, e.g. runs/dus_vs_midus")
    parser.add_argument("--out", type=Path, default=None,
                        help="path of the report (default: <experiment_dir>/report.md); the PNGs go next to it")
    options = parser.parse_args(sys.argv[1:] if args is None else args)
    try:
        path = write_report(options.experiment_dir, options.out)
    except (FileNotFoundError, NoRunError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path}, {path.parent / LOSS_PNG} and {path.parent / PPL_PNG}")

