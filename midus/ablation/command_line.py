"""The ``python -m midus`` command line around an ablation YAML: the runner's own flags
(``--arm``, ``--seeds``, ``--fresh``, ``--tune``, ``--jobs``) split from the arguments every arm's
fit gets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from midus.ablation.config import Ablation, AblationError, load_ablation, parse_jobs, parse_seeds
from midus.ablation.resume import FRESH_FLAG
from midus.ablation.tuning import TUNE_FLAG

CONFIG_FLAGS = ("--config", "-c")
ARM_FLAG = "--arm"
SEEDS_FLAG = "--seeds"
JOBS_FLAG = "--jobs"
_VALUE_FLAGS = (ARM_FLAG, SEEDS_FLAG, JOBS_FLAG)
_SWITCHES = (FRESH_FLAG, TUNE_FLAG)
SUBCOMMANDS = ("fit", "validate", "test", "predict")


@dataclass
class CommandLine:
    """A ``python -m midus`` command line around an ablation YAML."""

    ablation: Ablation
    subcommand: str | None
    before: list[str]
    """Arguments before the ablation's ``--config`` (the subcommand among them), runner flags removed."""
    after: list[str]
    """Arguments after it, runner flags removed: passed to every arm after the arm's config."""
    arms: list[str]
    """The arms to run: the ``--arm`` selection, or all arms in YAML order."""
    fresh: bool = False
    """``--fresh``: start the arms from step 0, deleting what their earlier runs left."""
    tune: bool = False
    """``--tune``: run the arms' tuning candidates (``ablation.tune``) instead of the arms."""
    jobs: int = 1
    """Runs at a time: ``--jobs``, else ``ablation.jobs``."""

    @property
    def seeds(self) -> list[int | None]:
        """The seeds every arm runs with (``--seeds``, else ``ablation.seeds``); ``[None]``: one unseeded run."""
        return list(self.ablation.seeds) if self.ablation.seeds is not None else [None]

    def for_arm(self, config: str) -> list[str]:
        """The arm's command line: the ablation's ``--config`` replaced by the arm's `config`."""
        return [*self.before, "--config", config, *self.after]


def parse_command_line(argv: Sequence[str]) -> CommandLine | None:
    """Split `argv`; None when no ``--config`` names an ablation YAML (then it is a plain run).

    ``--seeds 0,1,2`` replaces the YAML's ``ablation.seeds``, ``--jobs N`` its ``ablation.jobs``.

    Raises:
        AblationError: on an unknown arm, malformed seeds, ``--seed_everything`` together with
            seeds, or a runner flag without an ablation YAML.
    """
    argv = [str(arg) for arg in argv]
    for index, arg in enumerate(argv):
        flag, _, inline = arg.partition("=")
        if flag not in CONFIG_FLAGS:
            continue
        width = 1 if inline else 2
        value = inline or (argv[index + 1] if index + 1 < len(argv) else "")
        try:
            ablation = load_ablation(value) if Path(value).is_file() else None
        except yaml.YAMLError:
            ablation = None  # LightningCLI reports unreadable configs
        if ablation is None:
            continue
        before, after = _without_runner_flags(argv[:index]), _without_runner_flags(argv[index + width :])
        seeds = before.seeds or after.seeds
        if seeds is not None:
            ablation.seeds = parse_seeds(seeds, SEEDS_FLAG)
        if ablation.seeds is not None and any(a.partition("=")[0] == "--seed_everything" for a in argv):
            raise AblationError(
                f"{ablation.path}: --seed_everything sets one seed for every run; with seeds "
                f"({SEEDS_FLAG} or ablation.seeds) each run's seed comes from that list"
            )
        jobs = before.jobs or after.jobs
        jobs = parse_jobs(jobs, JOBS_FLAG) if jobs is not None else ablation.jobs
        subcommand = next((a for a in argv if a in SUBCOMMANDS), None)
        arms = _select(ablation, before.arms + after.arms)
        return CommandLine(
            ablation, subcommand, before.kept, after.kept, arms, FRESH_FLAG in argv, TUNE_FLAG in argv, jobs
        )
    for flag, what in (
        (ARM_FLAG, "selects arms"),
        (SEEDS_FLAG, "sets the seeds"),
        (FRESH_FLAG, "starts arms afresh"),
        (TUNE_FLAG, "tunes the arms"),
        (JOBS_FLAG, "sets the runs at a time"),
    ):
        if any(arg.partition("=")[0] == flag for arg in argv):
            raise AblationError(f"{flag} {what} of an ablation YAML (one with an 'ablation:' section); none was given")
    return None


@dataclass
class _Split:
    kept: list[str]
    arms: list[str]
    seeds: str | None
    jobs: str | None = None


def _without_runner_flags(argv: list[str]) -> _Split:
    """`argv` without the runner's flags; the arms, seeds and jobs those gave."""
    split, index = _Split([], [], None), 0
    while index < len(argv):
        flag, equals, inline = argv[index].partition("=")
        if flag in _SWITCHES:
            if equals:
                raise AblationError(f"{flag} takes no value")
            index += 1
            continue
        if flag not in _VALUE_FLAGS:
            split.kept.append(argv[index])
            index += 1
            continue
        if not equals and index + 1 >= len(argv):
            what = {ARM_FLAG: " (arm names)", SEEDS_FLAG: " (seeds: 0,1,2)", JOBS_FLAG: " (runs at a time: 2)"}
            raise AblationError(f"{flag} needs a value" + what[flag])
        value = inline if equals else argv[index + 1]
        if flag == ARM_FLAG:
            split.arms += [name.strip() for name in value.split(",") if name.strip()]
        elif flag == SEEDS_FLAG:
            split.seeds = value
        else:
            split.jobs = value
        index += 1 if equals else 2
    return split


def _select(ablation: Ablation, selection: list[str]) -> list[str]:
    unknown = [arm for arm in selection if arm not in ablation.arms]
    if unknown:
        raise AblationError(
            f"{ablation.path}: unknown arm(s) {', '.join(map(repr, unknown))}; the arms are: {', '.join(ablation.arms)}"
        )
    chosen = set(selection)
    return [arm for arm in ablation.arms if arm in chosen] if selection else list(ablation.arms)
