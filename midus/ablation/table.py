"""The table of an ablation: one row per arm, read from the arms' ``summary.json`` files.

`COLUMNS` is the one place that defines what the table shows: a new column is one more
`Column` (a title for Markdown, a name for CSV, and the dotted key of ``summary.json`` it
reads; see `midus.run_files` for the keys). Every arm the YAML defines gets a
row, whether it ran now, earlier, or on another machine and was copied into
``<save_dir>/<experiment>/<arm>/``; an arm without a ``summary.json`` is marked "not run".
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from midus.run_files import SUMMARY_FILE, value_at

MIB = 2**20


def _key(path: str) -> Callable[[dict[str, Any]], Any]:
    """A reader of ``a.b.c`` from a nested summary record (None where absent)."""
    return lambda record: value_at(record, path)


def _scaled(path: str, factor: float) -> Callable[[dict[str, Any]], Any]:
    read = _key(path)
    return lambda record: None if read(record) is None else read(record) * factor


def _peak_mib(record: dict[str, Any]) -> float | None:
    peak = _key("peak_memory.bytes")(record)
    return None if peak is None else peak / MIB


@dataclass(frozen=True)
class Column:
    """One column of the ablation table."""

    title: str
    """Header in the Markdown table."""
    name: str
    """Header in the CSV file (machine-friendly)."""
    read: Callable[[dict[str, Any]], Any]
    """The raw value from an arm's summary record (None where absent); written as is to the CSV."""
    fmt: str = "{}"
    """`str.format` pattern of a value in the Markdown table."""


COLUMNS: list[Column] = [
    Column("total params", "params_total", _key("params.total"), "{:,}"),
    Column("added params", "params_added", _key("params.added"), "{:,}"),
    Column("trainable params", "params_trainable", _key("params.trainable"), "{:,}"),
    Column("memory params", "params_memory", _key("params.memory"), "{:,}"),
    Column("val ppl", "val_ppl", _key("val.ppl"), "{:.2f}"),
    Column("val recall", "val_recall_acc", _key("val.recall_acc"), "{:.3f}"),
    Column("val recall (held-out)", "val_recall_acc_heldout", _key("val.recall_acc_heldout"), "{:.3f}"),
    Column("recall old people (replay)", "val_recall_acc_replay", _key("val.recall_acc_replay"), "{:.3f}"),
    # What zeroing every memory branch costs (midus.training.memory_zeroed): ~0 = memory unused.
    Column("memory zeroed: +val loss", "memory_zeroed_loss", _key("memory_zeroed_delta.loss"), "{:+.3f}"),
    Column("memory zeroed: -recall", "memory_zeroed_recall_acc", _key("memory_zeroed_delta.recall_acc"), "{:+.3f}"),
    # Slot health at the end (midus.training.memory_health): usage ≥ 50 %, entropy well under log k.
    Column("slot usage", "memory_usage", _key("memory_usage.usage"), "{:.1%}"),
    Column("KL from uniform", "memory_kl_uniform", _key("memory_usage.kl_uniform"), "{:.2f}"),
    Column("entropy / log k", "memory_entropy_over_log_k", _key("memory_usage.entropy_over_log_k"), "{:.2f}"),
    Column("memory engaged at step", "memory_engaged_step", _key("memory_engaged_step"), "{}"),
    Column("train tokens/s", "train_tokens_per_sec", _key("train.tokens_per_sec"), "{:,.0f}"),
    Column("step ms", "train_step_ms", _scaled("train.mean_step_time_s", 1e3), "{:.0f}"),
    Column("prefill ms", "prefill_ms", _key("latency.prefill_ms"), "{:.1f}"),
    Column("decode ms/token", "decode_ms_per_token", _key("latency.decode_ms_per_token"), "{:.2f}"),
    Column("peak memory (MiB)", "peak_memory_mib", _peak_mib, "{:,.1f}"),
    Column("memory measured as", "peak_memory_kind", _key("peak_memory.kind")),
]


@dataclass
class ArmRow:
    """An arm's line of the table: its status and its summary record (None when there is none)."""

    arm: str
    status: str
    record: dict[str, Any] | None


def collect_rows(experiment_dir: Path, arms: list[str], exit_codes: dict[str, int]) -> list[ArmRow]:
    """One row per arm, in YAML order, from ``experiment_dir/<arm>/summary.json``.

    `exit_codes` holds the arms run by this invocation; a non-zero code marks the arm failed
    (its summary, if the run got far enough to write one, is still shown).
    """
    rows = []
    for arm in arms:
        path = experiment_dir / arm / SUMMARY_FILE
        record = None
        status = "not run"
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                status = "ok"
            except (OSError, ValueError) as error:
                status = f"unreadable {SUMMARY_FILE}: {error}"
        if exit_codes.get(arm, 0) != 0:
            status = f"failed (exit {exit_codes[arm]})"
        rows.append(ArmRow(arm, status, record))
    return rows


def markdown_table(rows: list[ArmRow], columns: list[Column] = COLUMNS) -> str:
    """The rows as a GitHub Markdown table (empty cells where a value is missing)."""
    lines = [
        "| " + " | ".join(["arm", "status", *(c.title for c in columns)]) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for row in rows:
        cells = [row.arm, row.status]
        for column in columns:
            value = column.read(row.record) if row.record is not None else None
            cells.append("" if value is None else column.fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(experiment_dir: Path, experiment: str, rows: list[ArmRow], columns: list[Column] = COLUMNS) -> str:
    """Write ``summary.md`` and ``summary.csv`` into `experiment_dir`; returns the Markdown table."""
    table = markdown_table(rows, columns)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    (experiment_dir / "summary.md").write_text(f"# Ablation: {experiment}\n\n{table}", encoding="utf-8")
    with open(experiment_dir / "summary.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["arm", "status", *(c.name for c in columns)])
        for row in rows:
            values = [c.read(row.record) if row.record is not None else None for c in columns]
            writer.writerow([row.arm, row.status, *("" if v is None else v for v in values)])
    return table
