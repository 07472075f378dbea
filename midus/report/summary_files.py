"""The files an ablation's tables go to, in ``<save_dir>/<experiment>/``: ``summary.md`` (the
Markdown, with the seeded sections first when runs have seeds), ``summary.csv`` (one line per
run), ``summary_seeds.csv`` (means and interval bounds per arm) and ``ablation.json`` (arms,
seeds, references and the control arm, which ``report`` reads)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from midus.report.seed_table import seed_sections, write_seed_csv
from midus.report.table import COLUMNS, ArmRow, Column, markdown_table, timing_note, with_control
from midus.run_files import ABLATION_RECORD, Control


def write_tables(
    experiment_dir: Path,
    experiment: str,
    rows: list[ArmRow],
    columns: list[Column] = COLUMNS,
    references: Sequence[str] = (),
    control: Control | None = None,
) -> str:
    """Write ``summary.md`` and ``summary.csv`` (one line per run) into `experiment_dir`; returns the
    Markdown. Rows with seeds add the means and intervals over seeds, the paired differences to
    each of `references`, and ``summary_seeds.csv`` (`midus.report.seed_table`). `control` is
    the arm the bits-above-control columns subtract, seed by seed (`midus.report.table`)."""
    rows = with_control(rows, control)
    table = markdown_table(rows, columns)
    seeded = any(row.seed is not None for row in rows)
    if seeded:
        table = seed_sections(rows, columns, references, control) + "\n## Every run\n\n" + table
    timing = timing_note(rows)
    table = f"{timing}\n{table}" if timing else table
    experiment_dir.mkdir(parents=True, exist_ok=True)
    (experiment_dir / "summary.md").write_text(f"# Ablation: {experiment}\n\n{table}", encoding="utf-8")
    with open(experiment_dir / "summary.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["arm", "seed", "status", *(c.name for c in columns)])
        for row in rows:
            values = [c.value(row) for c in columns]
            seed = "" if row.seed is None else row.seed
            writer.writerow([row.arm, seed, row.status, *("" if v is None else v for v in values)])
    if seeded:
        write_seed_csv(experiment_dir / "summary_seeds.csv", rows, columns)
    layout = {
        "arms": list(dict.fromkeys(row.arm for row in rows)),
        "seeds": sorted({row.seed for row in rows if row.seed is not None}) if seeded else None,
        "reference": references[0] if references else None,
        "references": list(references),
        "control": control,
    }
    (experiment_dir / ABLATION_RECORD).write_text(json.dumps(layout, indent=1) + "\n", encoding="utf-8")
    return table
