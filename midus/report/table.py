"""The table of an ablation: one row per arm, read from the arms' ``summary.json`` files.

`COLUMNS` is the one place that defines what the table shows: a new column is one more
`Column` (a title for Markdown, a name for CSV, and the dotted key of ``summary.json`` it
reads; see `midus.run_files` for the keys). Every arm the YAML defines gets a
row, whether it ran now, earlier, or on another machine and was copied into
``<save_dir>/<experiment>/<arm>/``; an arm without a ``summary.json`` is marked "not run".

A `ControlColumn` reads a run together with the control arm's run of the same seed
(`with_control`): the control is ``ablation.control``, by default the first ``ablation.reference``
arm (`midus.ablation.config`). "bits above control / added param" is, per seed, (the run's
knowledge bits - the control's) / the run's added parameters; "/ trainable param" divides the
same by the run's trainable parameters. "all bits / added param" is ``summary.json``'s
``knowledge_bits.bits_per_added_param``: every bit the model stores over the added count.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from midus.run_files import SUMMARY_FILE, Control, run_label, value_at

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


def _bits_above_control_per(parameters: str) -> Callable[[dict[str, Any], dict[str, Any]], float | None]:
    """(the run's knowledge bits - the control run's) / the run's `parameters` (a dotted key,
    ``params.added`` or ``params.trainable``); None where a count is 0 or a value missing."""

    def read(record: dict[str, Any], control: dict[str, Any]) -> float | None:
        bits, control_bits = value_at(record, "knowledge_bits.bits"), value_at(control, "knowledge_bits.bits")
        count = value_at(record, parameters)
        if bits is None or control_bits is None or not count:
            return None
        return (bits - control_bits) / count

    return read


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
    reference arm gives these columns a paired difference and a verdict (`midus.report.seed_table`)."""
    paired: str = "difference"
    """How a directed column pairs with the reference: ``difference`` (arm - reference) or
    ``ratio`` (arm / reference, for costs such as step time)."""

    def value(self, row: ArmRow) -> Any:
        """The row's value: `read` of its record (None without a record)."""
        return None if row.record is None else self.read(row.record)


@dataclass(frozen=True)
class ControlColumn(Column):
    """A column whose `read` takes the run's record and the control run's record of the same seed
    (`ArmRow.control`, set by `with_control`); empty where either is missing."""

    def value(self, row: ArmRow) -> Any:
        return None if row.record is None or row.control is None else self.read(row.record, row.control)


COLUMNS: list[Column] = [
    Column("total params", "params_total", _key("params.total"), "{:,}"),
    Column("added params", "params_added", _key("params.added"), "{:,}"),
    # An efficiency claim (fewer to train): paired as a ratio, as are the costs below.
    Column("trainable params", "params_trainable", _key("params.trainable"), "{:,}", "lower", "ratio"),
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
    # Bits above the control arm's of the same seed, per parameter the arm added / trains (module docstring).
    ControlColumn("bits above control / added param", "bits_above_control_per_added_param",
                  _bits_above_control_per("params.added"), "{:.4f}", "higher"),
    ControlColumn("bits above control / trainable param", "bits_above_control_per_trainable_param",
                  _bits_above_control_per("params.trainable"), "{:.4f}", "higher"),
    # Every bit the model stores over the added count (summary.json's bits_per_added_param), not what was added.
    Column("all bits / added param", "knowledge_bits_per_added_param", _key("knowledge_bits.bits_per_added_param"),
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
    # AdamW's moments and step counters as the run built them (summary.json's optimizer_state).
    Column("optimizer state (MiB)", "optimizer_state_mib", _scaled("optimizer_state.bytes", 1 / MIB), "{:,.2f}",
           "lower", "ratio"),
    Column("peak memory (MiB)", "peak_memory_mib", _peak_mib, "{:,.1f}", "lower", "ratio"),
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
    control: dict[str, Any] | None = None
    """The summary record of the control arm's run of the same seed (`with_control`; None: none)."""

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


def control_of(control: Control | None, arm: str) -> str | None:
    """The arm whose bits `arm`'s bits-above-control columns subtract (None: no control)."""
    return control.get(arm) if isinstance(control, dict) else control


def with_control(rows: list[ArmRow], control: Control | None) -> list[ArmRow]:
    """The rows, each with the record of its control arm's finished run of the same seed (the
    control's own rows included); unchanged when `control` is None."""
    if control is None:
        return rows
    records = {(row.arm, row.seed): row.record for row in rows if row.status == "ok"}
    return [
        dataclasses.replace(row, control=records.get((control_of(control, row.arm), row.seed))) for row in rows
    ]


def timing_note(rows: list[ArmRow]) -> str:
    """A caption line: how the finished runs were timed (``timing`` of their summaries), since runs
    sharing a machine slow each other's steps and latencies; "" without finished runs."""
    groups: dict[str, int] = {}
    for row in rows:
        if row.status != "ok" or row.record is None:
            continue
        timing, device = value_at(row.record, "timing"), value_at(row.record, "device") or "an unrecorded device"
        if not isinstance(timing, dict):
            how = "with no timing record (a summary.json from before the kit recorded it)"
        else:
            at_a_time = timing.get("runs_at_a_time")
            how = ("by a fit outside the ablation runner" if at_a_time is None
                   else "one at a time" if at_a_time == 1 else f"up to {at_a_time} at a time")
            how += (f" on {device}, {timing.get('torch_threads')} torch thread(s) each, "
                    f"{timing.get('cpu_cores')} CPU core(s) available")
        groups[how] = groups.get(how, 0) + 1
    if not groups:
        return ""
    parts = [f"{count} run{'s' if count > 1 else ''} {how}" for how, count in groups.items()]
    return ("Timing (step ms, tokens/s, prefill and decode latency): " + "; ".join(parts) + ". Runs that share "
            "the machine slow each other's steps; compare times and their ratios between runs timed alike.\n")


def markdown_table(rows: list[ArmRow], columns: list[Column] = COLUMNS) -> str:
    """The rows as a GitHub Markdown table (empty cells where a value is missing)."""
    lines = [
        "| " + " | ".join(["arm", "status", *(c.title for c in columns)]) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for row in rows:
        cells = [row.label, row.status]
        for column in columns:
            value = column.value(row)
            cells.append("" if value is None else column.fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
