"""Reading an ablation YAML (format: see `midus.ablation`) and building each arm's config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from midus.run_files import Control, run_label, value_at

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
# Arm and experiment names become directory names.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


class AblationError(ValueError):
    """A malformed ablation YAML, an unknown arm, or an arm whose configuration is invalid."""


def expand_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn top-level dotted keys (``model.config.d_model: 64``) into nested mappings, merged in order."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        for part in reversed(str(key).split(".")):
            value = {part: value}
        nested = deep_merge(nested, value)
    return nested


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new mapping: `override` merged onto `base`; mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_TUNE_KEYS = {"seed", "metric", "overrides", "candidates", "keep"}

@dataclass
class TuneSpec:
    """``ablation.tune``: the candidates every arm runs with, on the tuning runs' own data."""

    seed: int
    metric: str
    """Dotted key of ``summary.json`` (e.g. ``val.loss``); the candidate with the lowest value wins."""
    overrides: dict[str, Any]
    """Flat dotted overrides every tuning run gets after its arm's (nested by `expand_dotted`)."""
    candidates: dict[str, dict[str, Any]]
    """Candidate name → flat dotted overrides, applied last."""
    keep: dict[str, list[str]] = field(default_factory=dict)
    """Arm → dotted keys the arm keeps from its own overrides under every candidate: an arm defined
    by a setting a candidate would change (memory at the base rate) is tuned with that setting held."""


def parse_tune(section: Any, where: str) -> TuneSpec:
    """`section` (the YAML's ``ablation.tune``) as a `TuneSpec`; an `AblationError` naming `where` otherwise."""
    if not isinstance(section, dict) or set(section) - _TUNE_KEYS or "candidates" not in section:
        raise AblationError(
            f"{where}: expected a mapping with 'candidates' and optionally 'seed', 'metric', 'overrides', 'keep'; "
            f"got {section!r}"
        )
    seed = section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AblationError(f"{where}.seed: expected a non-negative integer, got {seed!r}")
    metric = section.get("metric", "val.loss")
    if not isinstance(metric, str) or not metric:
        raise AblationError(f"{where}.metric: expected a summary.json key such as 'val.loss', got {metric!r}")
    overrides = section.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise AblationError(f"{where}.overrides: expected a mapping of dotted keys, got {overrides!r}")
    candidates = section["candidates"]
    if not isinstance(candidates, dict) or len(candidates) < 2:
        raise AblationError(f"{where}.candidates: expected at least two named candidates, got {candidates!r}")
    for name, values in candidates.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise AblationError(
                f"{where}.candidates: name {name!r} must be a directory name (letters, digits, '_', '.', '+', '-')"
            )
        if not isinstance(values, dict) or not values:
            raise AblationError(f"{where}.candidates.{name}: expected a non-empty mapping of dotted keys")
    keys = {name: set(values) for name, values in candidates.items()}
    first, *_ = keys
    for name, names in keys.items():
        if names != keys[first]:
            # An arm carries its chosen candidate's values; a key only some candidates set would keep
            # that value under the others, and the tuning runs would not be the ones that ran.
            raise AblationError(
                f"{where}.candidates: every candidate must set the same keys; {first} sets "
                f"{', '.join(sorted(keys[first]))} and {name} sets {', '.join(sorted(names))}"
            )
    keep = section.get("keep") or {}
    if not isinstance(keep, dict) or not all(
        isinstance(keys, list) and keys and all(isinstance(key, str) and key for key in keys) for keys in keep.values()
    ):
        raise AblationError(
            f"{where}.keep: expected arm -> a list of dotted keys (e.g. [model.memory_optimizer.learning_rate]), "
            f"got {keep!r}"
        )
    return TuneSpec(
        seed, metric, dict(overrides), {str(name): dict(values) for name, values in candidates.items()},
        {str(arm): list(keys) for arm, keys in keep.items()},
    )


def parse_control(
    given: Any, arms: dict[str, Any], fail: Callable[[str], AblationError]
) -> Control | None:
    """``ablation.control``: an arm (every arm's control), or a mapping of control arms to the arms
    each is the control of (an arm with no control is left out), returned as arm → its control with
    each control its own. A frozen arm's control is the base that trains nothing, a trainable arm's
    the base that continues: ``{base: [dus_frozen], base_continued: [dus]}``."""
    if given is None or isinstance(given, str):
        if given is not None and given not in arms:
            raise fail(f"control={given!r} is not an arm; the arms are: {', '.join(arms)}")
        return given
    if not isinstance(given, dict) or not all(isinstance(controlled, list) for controlled in given.values()):
        raise fail(f"control: expected an arm, or a mapping of control arms to lists of arms; got {given!r}")
    per_arm: dict[str, str] = {}
    for control, controlled in given.items():
        for arm in [control, *controlled]:
            if arm not in arms:
                raise fail(f"control: {arm!r} is not an arm; the arms are: {', '.join(arms)}")
            if per_arm.get(arm, control) != control:
                raise fail(f"control: {arm!r} has two controls, {per_arm[arm]!r} and {control!r}")
            per_arm[arm] = control
    return per_arm


@dataclass
class Ablation:
    """An ablation YAML: its name, the shared base config, each arm's overrides (nested), its seeds
    (None: one run per arm, with the base's ``seed_everything``), its reference arm, its tuning
    candidates and how many runs go at a time."""

    path: Path
    name: str
    base: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    seeds: list[int] | None = None
    references: list[str] = field(default_factory=list)
    """``ablation.reference`` (an arm or a list of arms): each gets its own table of paired differences."""
    tune: TuneSpec | None = None
    """``ablation.tune``: the candidates ``--tune`` runs every arm with (`midus.ablation.tuning`)."""
    jobs: int = 1
    """``ablation.jobs``: runs at a time (``--jobs`` replaces it)."""
    control: Control | None = None
    """``ablation.control``: the arm without up-scaling whose knowledge bits the bits-above-control
    columns subtract, seed by seed (`midus.report.table`); default: the first reference arm. Or
    per arm (`parse_control`): each control arm → the arms it is the control of."""

    @property
    def reference(self) -> str | None:
        """The first reference arm (the one ``report`` pairs against), None without one."""
        return self.references[0] if self.references else None

    def arm_config(self, arm: str, seed: int | None = None) -> dict[str, Any]:
        """The run's full single-run config: base + overrides, logging to ``<save_dir>/<name>/<arm>``;
        with a `seed`, ``seed_everything: seed`` and logging to ``<save_dir>/<name>/<arm>/seed<seed>``."""
        config = deep_merge(self.base, self.arms[arm])
        if seed is not None:
            config["seed_everything"] = seed
        trainer = dict(config.get("trainer") or {})
        logger = trainer.get("logger")
        if logger is None or logger is True:
            init_args: dict[str, Any] = {}
        elif isinstance(logger, dict) and str(logger.get("class_path", "")).split(".")[-1] == "TensorBoardLogger":
            init_args = dict(logger.get("init_args") or {})
        else:
            raise AblationError(
                f"{self.path}: arm {arm!r}: arms log with a TensorBoardLogger into <save_dir>/{self.name}/{arm}; "
                f"trainer.logger is {logger!r}"
            )
        init_args.setdefault("save_dir", "runs")
        init_args.update(name=self.name, version=run_label(arm, seed))
        trainer["logger"] = {"class_path": TENSORBOARD, "init_args": init_args}
        config["trainer"] = trainer
        return config


def load_ablation(path: str | Path) -> Ablation | None:
    """Read an ablation YAML; None when the file has no top-level ``ablation:`` section."""
    path = Path(path)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or "ablation" not in document:
        return None
    section = document.pop("ablation")

    def fail(message: str) -> AblationError:
        return AblationError(f"{path}: ablation: {message}")

    known = {"name", "arms", "seeds", "reference", "control", "tune", "jobs"}
    if not isinstance(section, dict) or set(section) - known:
        raise fail(
            "expected a mapping with the keys 'arms' and optionally 'name', 'seeds', 'reference', 'control', 'tune', "
            f"'jobs'; got {section!r}"
        )
    name = section.get("name") or path.stem
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise fail(f"name={name!r} must be a directory name (letters, digits, '_', '.', '+', '-')")
    arms = section.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise fail("arms must map each arm's name to its overrides ({} for the base as is)")
    nested = {}
    for arm, overrides in arms.items():
        if not isinstance(arm, str) or not _NAME.fullmatch(arm):
            raise fail(f"arm name {arm!r} must be a directory name (letters, digits, '_', '.', '+', '-')")
        if not isinstance(overrides, (dict, type(None))):
            raise fail(f"arm {arm!r}: overrides must be a mapping, got {overrides!r}")
        nested[arm] = expand_dotted(overrides or {})
    seeds = section.get("seeds")
    if seeds is not None:
        seeds = parse_seeds(seeds, f"{path}: ablation.seeds")
        if any("seed_everything" in overrides for overrides in nested.values()):
            raise fail("with seeds, an arm cannot set seed_everything (each run's seed comes from ablation.seeds)")
    given = section.get("reference")
    references = [given] if isinstance(given, str) else given if given is not None else []
    if not isinstance(references, list) or any(not isinstance(arm, str) or arm not in nested for arm in references):
        raise fail(f"reference={given!r} is not an arm or a list of arms; the arms are: {', '.join(nested)}")
    control = parse_control(section.get("control", references[0] if references else None), nested, fail)
    tune = parse_tune(section["tune"], f"{path}: ablation.tune") if section.get("tune") is not None else None
    for arm, keys in (tune.keep if tune else {}).items():
        missing = [key for key in keys if arm not in nested or value_at(nested[arm], key) is None]
        if missing:
            raise fail(
                f"tune.keep.{arm}: {', '.join(missing)} is not set by an arm {arm!r}; the arms are: {', '.join(nested)}"
            )
    jobs = parse_jobs(section.get("jobs", 1), f"{path}: ablation.jobs")
    return Ablation(path, name, document, nested, seeds, references, tune, jobs, control)


def parse_jobs(value: Any, where: str) -> int:
    """`value` (an int or a numeric string) as a number of runs at a time, at least 1."""
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        jobs = int(str(value).strip())
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise AblationError(f"{where}: expected a whole number of runs at a time (1 or more), got {value!r}")
    return jobs


def parse_seeds(value: Any, where: str) -> list[int]:
    """`value` (a list of ints, or a string like ``"0,1,2"``) as distinct non-negative seeds, in order.

    Raises:
        AblationError: naming `where` when `value` is not such a list.
    """
    items = value.split(",") if isinstance(value, str) else value
    try:
        if not isinstance(items, list) or not items or any(isinstance(i, (bool, float)) for i in items):
            raise ValueError
        seeds = [int(str(item).strip()) for item in items]
    except ValueError:
        seeds = None
    if seeds is None or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise AblationError(f"{where}: expected distinct non-negative integer seeds such as [0, 1, 2], got {value!r}")
    return seeds
