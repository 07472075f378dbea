"""The arms of an experiment folder, read from the files alone: scalars, summary and token axis.

An arm is every direct subfolder holding ``events.out.tfevents.*`` files
(``runs/<experiment>/<arm>/``, or ``version_0/`` of a plain run); the folder itself counts as
one arm, named after it, when it holds event files directly. A seeded ablation's runs are the
``<arm>/seed<k>/`` folders of a subfolder without event files of its own: one run each,
named ``<arm>/seed<k>``. Several event files of one arm (a
resumed run, a later ``validate``) are merged by step, the later one winning a step logged
twice. An arm without ``summary.json`` (crashed, still running) gets its record from its event
files.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from midus.run_files import EVENTS_GLOB, SUMMARY_FILE, SUMMARY_VAL_METRICS, value_at

# Keys of a summary.json record that older or partial records lack and the arm folder can supply.
FILLABLE = ("params.total", "params.trainable", "params.memory", "params.added", "val.best_loss", "train.tokens")

Series = list[tuple[int, float]]
SEED_FOLDER = re.compile(r"seed\d+")


class NoRunError(ValueError):
    """The experiment folder holds no run to report."""


@dataclass
class Arm:
    """One run of the experiment: its merged scalars and the summary record its table row shows."""

    name: str
    event_files: int
    scalars: dict[str, Series]
    record: dict[str, Any]
    status: str
    sources: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    arm: str = ""
    """The ablation arm this run belongs to: `name` without ``/seed<k>`` (set by `collect_arms`)."""
    seed: int | None = None
    """The run's seed when it is one of a seeded ablation's ``<arm>/seed<k>`` folders."""


def read_scalars(arm_dir: Path) -> dict[str, Series]:
    """Every scalar of the arm's event files, by tag: ``[(step, value)]`` sorted by step, one per step.

    Files merge by step, the later wall time winning. Each process counts ``train/tokens`` from
    0: a file's count continues the earlier files' at the last step logged before its first.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = []
    for path in arm_dir.glob(EVENTS_GLOB):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        events.Reload()
        tags = events.Tags()["scalars"]
        series = {tag: [(e.step, e.wall_time, e.value) for e in events.Scalars(tag)] for tag in tags}
        files.append((min((p[1] for points in series.values() for p in points), default=0.0), path.name, series))
    latest: dict[str, dict[int, tuple[float, float]]] = {}
    for _, _, series in sorted(files, key=lambda file: file[:2]):
        counted = latest.get("train/tokens", {})
        if series.get("train/tokens") and counted:
            before = [step for step in counted if step < series["train/tokens"][0][0]]
            offset = counted[max(before)][1] if before else 0.0
            series["train/tokens"] = [(step, wall, value + offset) for step, wall, value in series["train/tokens"]]
        for tag, points in series.items():
            by_step = latest.setdefault(tag, {})
            for step, wall, value in points:
                if step not in by_step or wall >= by_step[step][0]:
                    by_step[step] = (wall, value)
    return {tag: [(step, by_step[step][1]) for step in sorted(by_step)] for tag, by_step in latest.items()}


def _record_from_events(scalars: dict[str, Series], params: dict[str, int]) -> dict[str, Any]:
    """A summary.json-shaped record from the event files (and hparams.yaml's parameter counts)."""
    def last(tag: str) -> float | None:
        return scalars[tag][-1][1] if scalars.get(tag) else None

    val = {name.removeprefix("val/"): last(name) for name in SUMMARY_VAL_METRICS}
    trained = [value for step, value in scalars.get("val/loss", []) if step > 0]  # step 0: untrained
    val["best_loss"] = min(trained) if trained else None
    train_steps = [series[-1][0] for tag, series in scalars.items() if tag.startswith("train/") and series]
    tokens = scalars.get("train/tokens")
    train = {"steps": max(train_steps) + 1 if train_steps else None, "tokens": tokens[-1][1] if tokens else None,
             "tokens_per_sec": last("train/tokens_per_sec")}
    return {"params": dict(params), "val": val, "train": train}


def _read_summary(path: Path) -> tuple[dict[str, Any] | None, str]:
    if not path.is_file():
        return None, f"no {SUMMARY_FILE}"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        sections = ("params", "val", "train")
        if not isinstance(summary, dict) or any(not isinstance(summary.get(k, {}), dict) for k in sections):
            raise ValueError("not a summary record")
        return summary, ""
    except (OSError, ValueError) as error:
        return None, f"unreadable {SUMMARY_FILE} ({error})"


def load_arm(name: str, arm_dir: Path) -> Arm:
    """Read one arm folder; its record is summary.json with gaps filled from the folder, else events only."""
    scalars, files = read_scalars(arm_dir), len(list(arm_dir.glob(EVENTS_GLOB)))
    hparams = arm_dir / "hparams.yaml"  # read as text: the params/* counts only, no YAML tags to trust
    text = hparams.read_text(encoding="utf-8", errors="replace") if hparams.is_file() else ""
    params = {key: int(count) for key, count in re.findall(r"^params/(\w+):\s*(-?\d+)\s*$", text, re.MULTILINE)}
    from_events = _record_from_events(scalars, params)
    summary, error = _read_summary(arm_dir / SUMMARY_FILE)
    if summary is None:
        what = f"{files} event file(s)" + (" and hparams.yaml (params)" if params else "")
        rate = "; tokens/s is the logged train/tokens_per_sec (wall clock)" if "train/tokens_per_sec" in scalars else ""
        sources = [f"{error}: table from {what}{rate}"]
        return Arm(name, files, scalars, from_events, f"{error}; from event files", sources)
    record, sources = copy.deepcopy(summary), ["table from summary.json"]
    filled = [key for key in FILLABLE if value_at(summary, key) is None and value_at(from_events, key) is not None]
    for key in filled:
        section, leaf = key.split(".")
        record.setdefault(section, {})[leaf] = value_at(from_events, key)
    if filled:
        sources.append(f"{', '.join(filled)} from the event files / hparams.yaml (not in summary.json)")
    return Arm(name, files, scalars, record, "ok", sources, summary)


def find_arm_dirs(experiment_dir: Path) -> list[tuple[str, Path]]:
    """(arm, folder) of every run in `experiment_dir`, in the ablation table's order, else by name.

    Raises `FileNotFoundError` (no such folder) or `NoRunError` (a `ValueError`: no event files),
    both naming the folder and what was expected.
    """
    if not experiment_dir.is_dir():
        raise FileNotFoundError(f"{experiment_dir} is not a folder: expected an experiment folder such as "
                                "runs/<experiment> (written by fit)")
    dirs = []
    for folder in sorted(path for path in experiment_dir.iterdir() if path.is_dir()):
        if any(folder.glob(EVENTS_GLOB)):
            dirs.append((folder.name, folder))
            continue
        seeds = [s for s in folder.iterdir() if SEED_FOLDER.fullmatch(s.name) and any(s.glob(EVENTS_GLOB))]
        for seed_dir in sorted(seeds, key=lambda s: int(s.name.removeprefix("seed"))):
            dirs.append((f"{folder.name}/{seed_dir.name}", seed_dir))  # a seeded ablation's run
    if any(experiment_dir.glob(EVENTS_GLOB)):
        dirs.insert(0, (experiment_dir.resolve().name, experiment_dir))
    if not dirs:
        raise NoRunError(f"{experiment_dir} holds no run: expected <arm>/{EVENTS_GLOB} files (written by fit)")
    order: list[str] = []
    table = experiment_dir / "summary.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8") as rows:
            order = [row.get("arm", "") for row in csv.DictReader(rows)]
    def position(run: tuple[str, Path]) -> tuple[int, str, int]:
        arm, seed = split_label(run[0])
        return (order.index(arm) if arm in order else len(order), arm, -1 if seed is None else seed)

    return sorted(dirs, key=position)


def split_label(label: str) -> tuple[str, int | None]:
    """(arm, seed) of a run label: ``"hive/seed2"`` -> ``("hive", 2)``, ``"hive"`` -> ``("hive", None)``."""
    arm, _, last = label.rpartition("/")
    return (arm, int(last.removeprefix("seed"))) if arm and SEED_FOLDER.fullmatch(last) else (label, None)


def collect_arms(experiment_dir: Path) -> list[Arm]:
    """Every run of the experiment folder (see `find_arm_dirs` for the errors)."""
    runs = []
    for name, path in find_arm_dirs(experiment_dir):
        run = load_arm(name, path)
        run.arm, run.seed = split_label(name)
        runs.append(run)
    return runs


def tokens_at(arm: Arm, steps: list[int]) -> tuple[np.ndarray | None, str]:
    """Training tokens at each logged step (step 0 = 0 tokens), and where they came from.

    From the ``train/tokens`` series (interpolated; past its end, at its mean rate); else
    summary.json's ``train.tokens / train.steps`` per step (a value logged at step s follows
    s + 1 optimizer steps); else ``(None, reason)``.
    """
    at = np.asarray(steps, dtype=float)
    points = [(s, v) for s, v in arm.scalars.get("train/tokens", []) if s > 0]
    if points:
        xs, ys = np.array([0.0] + [s for s, _ in points]), np.array([0.0] + [v for _, v in points])
        tokens = np.interp(at, xs, ys)
        beyond = at > xs[-1]
        tokens[beyond] = ys[-1] + (at[beyond] - xs[-1]) * ys[-1] / (xs[-1] + 1)
        return tokens, "train/tokens"
    total, trained = value_at(arm.summary, "train.tokens"), value_at(arm.summary, "train.steps")
    if total and trained:
        return np.where(at > 0, (at + 1) * total / trained, 0.0), "summary.json train.tokens / train.steps"
    return None, "no train/tokens logged and no summary.json train.tokens"
