"""The table of an ablation: one row per arm, read from the arms' ``summary.json`` files.

`COLUMNS` is the one place that defines what the table shows: a new column is one more
`Column` (a title for Markdown, a name for CSV, and the dotted key of ``summary.json`` it
reads; see `midus.run_files` for the keys). Every arm the YAML defines gets a
row, whether it ran now, earlier, or on another machine and was copied into
``<save_dir>/<experiment>/<arm>/``; an arm without a ``summary.json`` is marked "not run".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from midus.ablation.config import run_label
from midus.run_files import SUMMARY_FILE, value_at

MIB = 2**20


def _key(path: str) -> Callable[[dict[str, Any]], Any]:
    """A reader of ``a.b.c`` from a nested summary record (None where absent)."""
    return lambda record: value_at(record, path)


def _scaled(path: str, factor: float) -> Callable[[dict[str, Any]], Any]:
    read = _key(path)
    return lambda record: None if read(record) is None else read(record) * factor


def _train_val_gap(record: dict[str, Any]) -> float | None:
    val, train = _key("val.loss")(record), _key("train.loss")(record)
    return None if val is None or train is None else val - train


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
    better: str | None = None
    """"lower" or "higher" when the metric has a good direction: a seeded ablation with a
    reference arm gives these columns a paired difference and a verdict (`midus.ablation.seed_table`)."""
    paired: str = "difference"
    """How a directed column pairs with the reference: ``difference`` (arm - reference) or
    ``ratio`` (arm / reference, for costs such as step time)."""


COLUMNS: list[Column] = [
    Column("total params", "params_total", _key("params.total"), "{:,}"),
    Column("added params", "params_added", _key("params.added"), "{:,}"),
    Column("trainable params", "params_trainable", _key("params.trainable"), "{:,}"),
    Column("memory params", "params_memory", _key("params.memory"), "{:,}"),
    Column("best val loss", "val_best_loss", _key("val.best_loss"), "{:.3f}", "lower"),
    Column("val ppl", "val_ppl", _key("val.ppl"), "{:.2f}", "lower"),
    # Large when the model memorises its training text (val loss far above train loss).
    Column("train loss", "train_loss", _key("train.loss"), "{:.3f}"),
    Column("val - train loss", "train_val_gap", _train_val_gap, "{:+.3f}"),
    Column("val recall", "val_recall_acc", _key("val.recall_acc"), "{:.3f}", "higher"),
    Column("val recall (held-out)", "val_recall_acc_heldout", _key("val.recall_acc_heldout"), "{:.3f}", "higher"),
    Column("recall old people (replay)", "val_recall_acc_replay", _key("val.recall_acc_replay"), "{:.3f}", "higher"),
    # Bits of the corpus's facts the model stores (midus.probes.knowledge_bits; model.probes.knowledge_bits_people > 0).
    Column("knowledge bits", "knowledge_bits", _key("knowledge_bits.bits"), "{:,.0f}", "higher"),
    Column("knowledge bits (old people)", "knowledge_bits_replay", _key("knowledge_bits.bits_replay"), "{:,.0f}",
           "higher"),
    Column("bits per added param", "knowledge_bits_per_added_param", _key("knowledge_bits.bits_per_added_param"),
           "{:.4f}"),
    # What zeroing every memory branch costs (midus.training.memory_zeroed): ~0 = memory unused.
    Column("memory zeroed: +val loss", "memory_zeroed_loss", _key("memory_zeroed_delta.loss"), "{:+.3f}"),
    Column("memory zeroed: -recall", "memory_zeroed_recall_acc", _key("memory_zeroed_delta.recall_acc"), "{:+.3f}"),
    # Slot health at the end (midus.training.memory_health): usage ≥ 50 %, entropy well under log k.
    Column("slot usage", "memory_usage", _key("memory_usage.usage"), "{:.1%}"),
    Column("KL from uniform", "memory_kl_uniform", _key("memory_usage.kl_uniform"), "{:.2f}"),
    Column("entropy / log k", "memory_entropy_over_log_k", _key("memory_usage.entropy_over_log_k"), "{:.2f}"),
    Column("memory engaged at step", "memory_engaged_step", _key("memory_engaged_step"), "{}"),
    Column("train tokens/s", "train_tokens_per_sec", _key("train.tokens_per_sec"), "{:,.0f}"),
    Column("step ms", "train_step_ms", _scaled("train.mean_step_time_s", 1e3), "{:.0f}", "lower", "ratio"),
    Column("prefill ms", "prefill_ms", _key("latency.prefill_ms"), "{:.1f}", "lower", "ratio"),
    Column("decode ms/token", "decode_ms_per_token", _key("latency.decode_ms_per_token"), "{:.2f}", "lower", "ratio"),
    Column("peak memory (MiB)", "peak_memory_mib", _peak_mib, "{:,.1f}"),
    Column("memory measured as", "peak_memory_kind", _key("peak_memory.kind")),
]


@dataclass
class ArmRow:
    """A run's line of the table: its status and its summary record (None when there is none)."""

    arm: str
    status: str
    record: dict[str, Any] | None
    seed: int | None = None
    """The run's seed in a seeded ablation (None: the arm's one run)."""

    @property
    def label(self) -> str:
        return run_label(self.arm, self.seed)


def collect_rows(
    experiment_dir: Path, arms: list[str], exit_codes: dict[str, int], seeds: list[int | None] = (None,)
) -> list[ArmRow]:
    """One row per arm and seed, in YAML order, from ``experiment_dir/<arm>[/seed<k>]/summary.json``.

    `exit_codes` holds the runs of this invocation by `run_label`; a non-zero code marks the run
    failed (its summary, if the run got far enough to write one, is still shown).
    """
    rows = []
    for arm in arms:
        for seed in seeds:
            label = run_label(arm, seed)
            path = experiment_dir / label / SUMMARY_FILE
            record = None
            status = "not run"
            if path.is_file():
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                    status = "ok"
                except (OSError, ValueError) as error:
                    status = f"unreadable {SUMMARY_FILE}: {error}"
            if exit_codes.get(label, 0) != 0:
                status = f"failed (exit {exit_codes[label]})"
            rows.append(ArmRow(arm, status, record, seed))
    return rows


def markdown_table(rows: list[ArmRow], columns: list[Column] = COLUMNS) -> str:
    """The rows as a GitHub Markdown table (empty cells where a value is missing)."""
    lines = [
        "| " + " | ".join(["arm", "status", *(c.title for c in columns)]) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for row in rows:
        cells = [row.label, row.status]
        for column in columns:
            value = column.read(row.record) if row.record is not None else None
            cells.append("" if value is None else column.fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
