"""What an ablation records of its results, after its arms: the summary tables and TensorBoard HParams.

`write_tables` writes ``summary.md`` (the Markdown, with the seeded sections first when runs have
seeds), ``summary.csv`` (one line per run), ``summary_seeds.csv`` (means and interval bounds per
arm) and ``ablation.json`` (arms, seeds, references and the control arm, which ``report`` reads)
into ``<save_dir>/<experiment>/``; the tables themselves are `midus.report`'s.

TensorBoard HParams summaries of ablation runs: the whole ablation as one HParams table.

`write_hparams` puts one events file into a run's own TensorBoard folder (``runs/<experiment>/<arm>/``
or ``.../<arm>/seed<k>/``, next to Lightning's event files). With ``--logdir runs/<experiment>``
TensorBoard's hparams plugin (``tensorboard/plugins/hparams/backend_context.py``) reads it so:

* every run holding a ``_hparams_/session_start_info`` summary is one session, named by the run
  (``<arm>`` or ``<arm>/seed<k>``); no group name is set, so each seed is its own row, filterable
  by the ``seed`` hparam;
* no ``_hparams_/experiment`` summary is written: the plugin takes the first one it finds as the
  column list of the whole experiment, so one written per run would hide the fields that other arms
  override. Without it the plugin unions the hparams of all session starts, and its metrics are
  every scalar tag of the session runs: the ``hparams/*`` tags written here and Lightning's own
  (``val/loss``, ...) from the same folder, each showing its last value;
* the plugin keeps the first session start of a run: the arm configs' TensorBoardLogger sets
  ``default_hp_metric: false``, so Lightning writes none of its own.

Pure TensorBoard protobufs (no TensorFlow, no Lightning), so the ablation runner can call it
after each fit without importing training code.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from midus.report.seed_table import seed_sections, write_seed_csv
from midus.report.table import COLUMNS, ArmRow, Column, markdown_table, timing_note, with_control
from midus.run_files import ABLATION_RECORD, Control, value_at

HParamValue = bool | int | float | str

METRIC_PREFIX = "hparams/"
# Recognisable and time-stamped: the name sorts after the fit's own event files, so a TensorBoard
# that is already running (it reads a folder's files in name order) also reads a rewritten one.
HPARAMS_EVENTS_SUFFIX = ".midus-hparams"
HPARAMS_EVENTS_GLOB = f"events.out.tfevents.*{HPARAMS_EVENTS_SUFFIX}"

KEY_CONFIG_FIELDS = (
    "seed_everything",
    "model.optimizer.learning_rate",
    "model.memory_optimizer.learning_rate",
    "model.config.d_model",
    "model.config.n_layers",
    "model.config.memory_layers",
    "model.config.memory.values",
    "model.config.memory.topk",
    "model.config.memory.n_subkeys",
    "model.upscale.method",
    "model.upscale.memory.values",  # an up-scaling's memory blocks are configured here
    "model.upscale.memory.topk",
    "model.upscale.memory.n_subkeys",
    "trainer.max_steps",
    "data.embedded.num_people",
)
"""Config fields every run reports (where its config has them), overridden by its arm or not."""

_MISSING = object()


def _perplexity(loss: float) -> float:
    """exp(loss), infinite where that overflows (a diverged run still gets a row)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# (tag without METRIC_PREFIX, dotted key of a summary.json record, how the value is converted)
_RECORD_METRICS: tuple[tuple[str, str, Callable[[float], float]], ...] = (
    ("val_ppl", "val.ppl", float),
    ("val_best_ppl", "val.best_loss", _perplexity),
    ("val_loss", "val.loss", float),
    ("val_best_loss", "val.best_loss", float),
    ("recall_acc", "val.recall_acc", float),  # new people
    ("recall_acc_heldout", "val.recall_acc_heldout", float),
    ("recall_acc_replay", "val.recall_acc_replay", float),  # old (replayed) people
    ("recall_acc_replay_heldout", "val.recall_acc_replay_heldout", float),
    ("knowledge_bits", "knowledge_bits.bits", float),
    ("memory_zeroed_delta_loss", "memory_zeroed_delta.loss", float),
    ("memory_zeroed_delta_recall_acc", "memory_zeroed_delta.recall_acc", float),
    ("step_time_ms", "train.mean_step_time_s", lambda seconds: 1000.0 * seconds),
    ("decode_ms_per_token", "latency.decode_ms_per_token", float),
    ("trainable_params", "params.trainable", float),
    ("optimizer_state_mib", "optimizer_state.bytes", lambda count: count / 2**20),
    ("peak_memory_mib", "peak_memory.bytes", lambda count: count / 2**20),
)


def hparam_value(value: Any) -> HParamValue:
    """`value` as an HParams value: bool, int, float or str; None is ``"none"``, lists are JSON text."""
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; `_MISSING` (unlike an explicit null) where a part is absent."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, HParamValue]:
    """Leaf paths of nested `overrides`, dotted; top-level dotted keys (the YAML form) stay as they are."""
    flat: dict[str, HParamValue] = {}
    for key, value in overrides.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))  # an empty mapping merges as a no-op: no leaf
        else:
            flat[path] = hparam_value(value)
    return flat


def hparams_of_arm(
    arm: str, seed: int | None, overrides: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, HParamValue]:
    """The HParams of one run: ``arm``, ``seed``, every field the arm overrides, the `KEY_CONFIG_FIELDS`.

    `overrides` is the arm's (nested) override mapping, `config` its merged config; keys are dotted
    config paths (``model.config.memory.values``), values bool/int/float/str (`hparam_value`).
    """
    hparams: dict[str, HParamValue] = {"arm": arm, "seed": hparam_value(seed)}
    hparams.update(_flatten(overrides))
    for field in KEY_CONFIG_FIELDS:
        value = _lookup(config, field)
        if value is not _MISSING:
            hparams.setdefault(field, hparam_value(value))
    return hparams


def metrics_of_record(record: Mapping[str, Any]) -> dict[str, float]:
    """HParams metrics (``hparams/val_ppl``, ...) of a summary.json record; absent or null values are skipped.

    ``hparams/val_best_ppl`` is exp(``val.best_loss``); ``hparams/step_time_ms`` is
    ``train.mean_step_time_s`` in milliseconds; ``*_mib`` are bytes in MiB.
    """
    metrics: dict[str, float] = {}
    for name, key, convert in _RECORD_METRICS:
        value = value_at(dict(record), key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[METRIC_PREFIX + name] = convert(value)
    return metrics


def _hparams_event(wall_time: float, step: int, tag: str, plugin_data: Any) -> Any:
    """An event holding one hparams-plugin summary (metadata only, as the plugin expects)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import metadata

    value = summary_pb2.Summary.Value(
        tag=tag, metadata=metadata.create_summary_metadata(plugin_data), tensor=metadata.NULL_TENSOR
    )
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=[value]))


def write_hparams(run_dir: Path, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> Path:
    """Write the run's HParams session (start, metrics as scalars at `step`, end) into `run_dir`.

    Replaces the run's earlier hparams file, so a rerun does not add a second session. Values of
    `hparams` go through `hparam_value`; None metrics are skipped. Returns the file written.
    """
    from tensorboard.compat.proto import event_pb2, summary_pb2, types_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from tensorboard.plugins.scalar import metadata as scalar_metadata
    from tensorboard.summary.writer.record_writer import RecordWriter
    from tensorboard.util import tensor_util

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=now)
    for name, value in hparams.items():
        value = hparam_value(value)
        if isinstance(value, bool):  # before number: a bool is an int
            start.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = value
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=now)
    scalar_kind = scalar_metadata.create_summary_metadata(display_name="", description="")
    scalar_kind.data_class = summary_pb2.DATA_CLASS_SCALAR
    scalars = [
        # float32, as Lightning's scalars: TensorBoard's default (Rust) loader drops float64 ones
        summary_pb2.Summary.Value(
            tag=tag, metadata=scalar_kind, tensor=tensor_util.make_tensor_proto(float(value), types_pb2.DT_FLOAT)
        )
        for tag, value in metrics.items()
        if value is not None
    ]
    events = [
        event_pb2.Event(wall_time=now, file_version="brain.Event:2"),
        _hparams_event(now, step, metadata.SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=start)),
        event_pb2.Event(wall_time=now, step=step, summary=summary_pb2.Summary(value=scalars)),
        _hparams_event(now, step, metadata.SESSION_END_INFO_TAG, HParamsPluginData(session_end_info=end)),
    ]
    # Written under a name TensorBoard ignores, then renamed: a reader never sees half a file.
    partial = run_dir / f".hparams{HPARAMS_EVENTS_SUFFIX}.partial"
    with open(partial, "wb") as file:
        writer = RecordWriter(file)
        for event in events:
            writer.write(event.SerializeToString())
    for previous in run_dir.glob(HPARAMS_EVENTS_GLOB):
        previous.unlink()
    path = run_dir / f"events.out.tfevents.{int(now):010d}{HPARAMS_EVENTS_SUFFIX}"
    os.replace(partial, path)
    return path


# The tables


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
