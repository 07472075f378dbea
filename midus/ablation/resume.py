"""What a run of an ablation does with each arm's run directory: skip, resume or start fresh.

The rules are the runner's (`midus.ablation.runner`, "Rerunning"). `plan_start` reads
``<save_dir>/<name>/<arm>/`` and writes nothing, so every arm is judged before any runs;
`ArmStart.prepare` then removes what a fresh start replaces and records how the arm is started.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from midus.ablation.command_line import FRESH_FLAG
from midus.ablation.config import AblationError
from midus.run_files import (
    ARM_COMMAND,
    ARM_CONFIG,
    CHECKPOINT_DIR,
    EVENTS_GLOB,
    HPARAMS_FILE,
    RUN_CONFIG,
    SUMMARY_FILE,
)

SKIP, RESUME, FRESH = "skip", "resume", "fresh"
_SHOWN_DIFFERENCES = 6


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file and the training step (``global_step``) it was saved at."""

    path: Path
    step: int
    mtime: float


@dataclass
class ArmStart:
    """How one arm starts: `SKIP` (finished earlier), `RESUME` from `checkpoint`, or `FRESH` from step 0."""

    action: str
    run_dir: Path
    checkpoint: Checkpoint | None = None
    remove: list[Path] = field(default_factory=list)
    """Files `prepare` deletes: a fresh start's earlier run, or a resumed arm's stale summary."""
    why: str = ""
    warnings: list[str] = field(default_factory=list)
    """Checkpoints that could not be read (so not resumed from)."""
    upgraded_config: dict[str, Any] | None = None
    """The recorded config with keys that moved since the run started at their new places (None when
    none moved): a resumed arm's fit reads its ``arm_config.yaml`` again, so `prepare` rewrites it."""

    def describe(self) -> str:
        """One line for the log: what happens to the arm."""
        if self.action == SKIP:
            return f"finished earlier ({SUMMARY_FILE}), skipped ({FRESH_FLAG} reruns it)"
        if self.action == RESUME:
            assert self.checkpoint is not None
            return f"resumed from {self.checkpoint.path} (step {self.checkpoint.step})"
        if not self.remove:
            return "fresh start"
        ours = {*self.remove, *(self.run_dir / name for name in (ARM_CONFIG, ARM_COMMAND, CHECKPOINT_DIR))}
        kept = sorted(path.name for path in self.run_dir.iterdir() if path not in ours)
        note = f"removed {len(self.remove)} file(s) of {self.why or 'an earlier attempt'}"
        return f"fresh start ({note}" + (f"; kept {', '.join(kept)})" if kept else ")")

    def arm_command(self, command: list[str]) -> list[str]:
        """The arm's ``python -m midus`` arguments: `command`, plus ``--ckpt_path`` when resuming."""
        if self.action == RESUME:
            assert self.checkpoint is not None
            return [*command, "--ckpt_path", str(self.checkpoint.path)]
        return list(command)

    def prepare(self, header: str, config: dict[str, Any], command: list[str]) -> None:
        """Delete `remove`; on a fresh start, record `config` and `command` (read by the next `plan_start`)."""
        for path in self.remove:
            path.unlink(missing_ok=True)
        checkpoints = self.run_dir / CHECKPOINT_DIR
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()
        if self.action == RESUME and self.upgraded_config is not None:
            _rewrite_with_moved_keys(self.run_dir / ARM_CONFIG, self.upgraded_config)
        if self.action != FRESH:
            return  # skipped and resumed arms keep the record their run was started with
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / ARM_CONFIG).write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        note = (
            "# The arguments the ablation runner started this arm with: python -m midus <args>.\n"
            "# A rerun compares them (and arm_config.yaml) before it skips or resumes the arm.\n"
        )
        (self.run_dir / ARM_COMMAND).write_text(note + yaml.safe_dump({"args": command}), encoding="utf-8")


def plan_start(run_dir: Path, config: dict[str, Any], command: list[str], fresh: bool) -> ArmStart:
    """Decide how the arm logging to `run_dir` starts, given its merged `config` and arm `command`
    (the ``python -m midus`` arguments with ``--config <run_dir>/arm_config.yaml``).

    Raises:
        AblationError: the directory holds a run (a summary or checkpoints) that was started with
            another config or command line, or without a record of them, or whose checkpoints
            are all unreadable; the message says to pass ``--fresh``.
    """
    if fresh:
        return ArmStart(FRESH, run_dir, remove=fit_files(run_dir), why=f"the earlier run ({FRESH_FLAG})")
    finished = is_finished(run_dir)
    checkpoint_files = sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt"))
    if not finished and not checkpoint_files:
        return ArmStart(FRESH, run_dir, remove=fit_files(run_dir))  # leftovers of an attempt with nothing to resume
    held = [SUMMARY_FILE] if finished else []
    held += [f"{len(checkpoint_files)} checkpoint(s)"] if checkpoint_files else []
    differences, upgraded = record_differences(run_dir, config, command)
    if differences:
        raise AblationError(
            f"{run_dir} holds a run ({', '.join(held)}) started {differences}; a rerun will not skip or resume "
            f"a different experiment. Pass {FRESH_FLAG} to delete that run and start the arm again from step 0, "
            "or rerun with the configuration and arguments it was started with"
        )
    if finished:
        return ArmStart(SKIP, run_dir, upgraded_config=upgraded)
    newest, warnings = newest_checkpoint(checkpoint_files)
    if newest is None:
        raise AblationError(
            f"{run_dir / CHECKPOINT_DIR}: no checkpoint can be read ({'; '.join(warnings)}); "
            f"pass {FRESH_FLAG} to start the arm again from step 0"
        )
    stale = [run_dir / SUMMARY_FILE] if (run_dir / SUMMARY_FILE).exists() else []  # unreadable or not this run's
    return ArmStart(RESUME, run_dir, checkpoint=newest, remove=stale, warnings=warnings, upgraded_config=upgraded)


def is_finished(run_dir: Path) -> bool:
    """Whether `run_dir` has a readable ``summary.json`` written by a fit of its ``arm_config.yaml``.

    A summary whose ``config_paths`` do not name that file is someone else's, e.g. a
    hand-made one or a plain run's: not a finished run of this arm.
    """
    try:
        record = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    paths = record.get("config_paths") if isinstance(record, dict) else None
    return isinstance(paths, list) and str(run_dir / ARM_CONFIG) in paths


def record_differences(run_dir: Path, config: dict[str, Any], command: list[str]) -> tuple[str, dict | None]:
    """How `config` and `command` differ from what `run_dir` records it was started with ("" when they do
    not), and the recorded config upgraded when keys moved since (`midus.moved_keys`; else None).

    A record written before keys moved is compared with each key at its new place: the same experiment,
    whatever the keys were called when it started."""
    from midus.moved_keys import MOVED_KEYS, upgrade_config

    try:
        recorded_config = yaml.safe_load((run_dir / ARM_CONFIG).read_text(encoding="utf-8"))
        recorded_args = yaml.safe_load((run_dir / ARM_COMMAND).read_text(encoding="utf-8"))["args"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return (
            f"without a readable record of how ({ARM_CONFIG}, {ARM_COMMAND}: a run from before the runner resumed?)",
            None,
        )
    upgraded = upgrade_config(recorded_config, MOVED_KEYS) if isinstance(recorded_config, dict) else recorded_config
    if upgraded != recorded_config:
        recorded_config = upgraded
    else:
        upgraded = None
    changes = config_changes(recorded_config, config)
    if len(changes) > _SHOWN_DIFFERENCES:
        changes = [*changes[:_SHOWN_DIFFERENCES], f"{len(changes) - _SHOWN_DIFFERENCES} more"]
    if recorded_args != command:
        changes.append(f"command line {shlex.join(map(str, recorded_args))!r}, now {shlex.join(command)!r}")
    return (f"with a different configuration ({'; '.join(changes)})" if changes else ""), upgraded


def _rewrite_with_moved_keys(path: Path, config: dict[str, Any]) -> None:
    """Write `config` (the record at `path`, its keys at their new places) over it, keeping its header."""
    header = "".join(line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                     if line.startswith("#"))
    note = "# Rewritten on resume with the keys that moved since at their new places (midus.moved_keys).\n"
    path.write_text(header + note + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs, as ``key: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*old, *(key for key in new if key not in old)]
        return [line for key in keys for line in config_changes(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def newest_checkpoint(paths: list[Path]) -> tuple[Checkpoint | None, list[str]]:
    """The checkpoint of the highest training step among `paths` (newest file first among equal steps),
    and a line per file that could not be read.

    The step is the file's own ``global_step``, not its name (``last.ckpt`` has none, and
    ``filename`` patterns vary) nor its mtime (copies reset it). Reading it maps the file
    (``mmap``) without reading the tensors, so a large checkpoint costs milliseconds.
    """
    import torch

    found, unreadable = [], []
    for path in paths:
        try:
            record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found.append(Checkpoint(path, int(record["global_step"]), path.stat().st_mtime))
        except Exception as error:  # truncated, not a Lightning checkpoint, ...: any reason to skip it is shown
            unreadable.append(f"{path.name}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}")
    # At equal steps the files hold the same training state; the last written has the newest callback states.
    return max(found, key=lambda checkpoint: (checkpoint.step, checkpoint.mtime), default=None), unreadable


def fit_files(run_dir: Path) -> list[Path]:
    """The files a ``fit`` writes into `run_dir` (summary, saved config, TensorBoard files, checkpoints).

    Only these: anything else there (analysis outputs, notes) is not a fit's and stays.
    The runner's own records are overwritten, not deleted.
    """
    named = [run_dir / name for name in (SUMMARY_FILE, RUN_CONFIG, HPARAMS_FILE)]
    globbed = [*run_dir.glob(EVENTS_GLOB), *(run_dir / CHECKPOINT_DIR).glob("*.ckpt")]
    return [path for path in [*named, *sorted(globbed)] if path.is_file()]
