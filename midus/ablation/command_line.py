"""The ``python -m midus`` command line around an ablation YAML, parsed once into a `CommandLine`::

    python -m midus fit --config experiments/x.yaml --arm a,b --seeds 0,1 --trainer.max_steps 10
                    ~~~          ~~~~~~~~~~~~~~~~~~ ~~~~~~~~~~~~~~~~~~~~~~ ~~~~~~~~~~~~~~~~~~~~~
                    subcommand   the ablation YAML  the runner's flags     what every arm's fit gets

`parse_command_line` finds the ``--config`` that names an ablation YAML and takes the runner's
flags (`RUNNER_FLAGS`) out; what is left is each arm's LightningCLI command line, with the arm's
config in place of the ablation's (`CommandLine.for_arm`). A command line without an ablation YAML
parses to None (the LightningCLI runs it as it is) and may carry none of the runner's flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from midus.ablation.config import Ablation, AblationError, load_ablation, parse_jobs, parse_seeds

CONFIG_FLAGS = ("--config", "-c")
SUBCOMMANDS = ("fit", "validate", "test", "predict")


@dataclass(frozen=True)
class RunnerFlag:
    """A flag the ablation runner reads; never passed on to an arm."""

    name: str
    does: str
    """What it does, in the error for a command line without an ablation YAML."""
    value: str | None = None
    """What its value is (in the error when it is missing); None: a switch, which takes none."""


ARM_FLAG, SEEDS_FLAG, FRESH_FLAG, TUNE_FLAG, JOBS_FLAG = "--arm", "--seeds", "--fresh", "--tune", "--jobs"
RUNNER_FLAGS = {
    flag.name: flag
    for flag in (
        RunnerFlag(ARM_FLAG, "selects arms", "arm names"),  # repeatable and/or comma-separated
        RunnerFlag(SEEDS_FLAG, "sets the seeds", "seeds: 0,1,2"),  # replaces ablation.seeds
        RunnerFlag(FRESH_FLAG, "starts arms afresh"),  # `midus.ablation.resume`
        RunnerFlag(TUNE_FLAG, "tunes the arms"),  # `midus.ablation.tuning`
        RunnerFlag(JOBS_FLAG, "sets the runs at a time", "runs at a time: 2"),  # replaces ablation.jobs
    )
}


@dataclass
class CommandLine:
    """A ``python -m midus`` command line around an ablation YAML: the runner's part and the arms' part."""

    ablation: Ablation
    """The YAML, with ``--seeds`` applied."""
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
    print_config: bool = False
    """``--print_config``: print every selected arm's resolved config and run nothing."""

    @property
    def seeds(self) -> list[int | None]:
        """The seeds every arm runs with (``--seeds``, else ``ablation.seeds``); ``[None]``: one unseeded run."""
        return list(self.ablation.seeds) if self.ablation.seeds is not None else [None]

    def for_arm(self, config: str) -> list[str]:
        """The arm's command line: the ablation's ``--config`` replaced by the arm's `config`."""
        return [*self.before, "--config", config, *self.after]


def parse_command_line(argv: Sequence[str]) -> CommandLine | None:
    """Split `argv`; None when no ``--config`` names an ablation YAML (then it is a plain run).

    Raises:
        AblationError: on an unknown arm, malformed seeds or jobs, ``--seed_everything`` together
            with seeds, or a runner flag without an ablation YAML.
    """
    argv = [str(arg) for arg in argv]
    found = _ablation_config(argv)
    if found is None:
        for flag in RUNNER_FLAGS.values():
            if any(arg.partition("=")[0] == flag.name for arg in argv):
                raise AblationError(
                    f"{flag.name} {flag.does} of an ablation YAML (one with an 'ablation:' section); none was given"
                )
        return None
    ablation, start, stop = found
    before, before_values = _without_runner_flags(argv[:start])
    after, after_values = _without_runner_flags(argv[stop:])

    def value(flag: str) -> str | None:  # the last one given before the ablation's --config, else after it
        return (before_values[flag] or [None])[-1] or (after_values[flag] or [None])[-1]

    if value(SEEDS_FLAG) is not None:
        ablation.seeds = parse_seeds(value(SEEDS_FLAG), SEEDS_FLAG)
    if ablation.seeds is not None and any(arg.partition("=")[0] == "--seed_everything" for arg in argv):
        raise AblationError(
            f"{ablation.path}: --seed_everything sets one seed for every run; with seeds "
            f"({SEEDS_FLAG} or ablation.seeds) each run's seed comes from that list"
        )
    jobs = parse_jobs(value(JOBS_FLAG), JOBS_FLAG) if value(JOBS_FLAG) is not None else ablation.jobs
    selection = [arm.strip() for given in before_values[ARM_FLAG] + after_values[ARM_FLAG] for arm in given.split(",")]
    return CommandLine(
        ablation,
        subcommand=next((arg for arg in argv if arg in SUBCOMMANDS), None),
        before=before,
        after=after,
        arms=_select(ablation, [arm for arm in selection if arm]),
        fresh=FRESH_FLAG in argv,
        tune=TUNE_FLAG in argv,
        jobs=jobs,
        print_config=any(arg.startswith("--print_config") for arg in argv),
    )


def _ablation_config(argv: list[str]) -> tuple[Ablation, int, int] | None:
    """The first ``--config`` naming an ablation YAML: the YAML, and where the flag with its value starts and stops."""
    for index, arg in enumerate(argv):
        flag, _, inline = arg.partition("=")
        if flag not in CONFIG_FLAGS:
            continue
        value = inline or (argv[index + 1] if index + 1 < len(argv) else "")
        try:
            ablation = load_ablation(value) if Path(value).is_file() else None
        except yaml.YAMLError:
            ablation = None  # LightningCLI reports unreadable configs
        if ablation is not None:
            return ablation, index, index + (1 if inline else 2)
    return None


def _without_runner_flags(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`argv` without the runner's flags, and the values each flag that takes one gave, in order."""
    kept: list[str] = []
    values: dict[str, list[str]] = {name: [] for name, flag in RUNNER_FLAGS.items() if flag.value is not None}
    index = 0
    while index < len(argv):
        name, equals, inline = argv[index].partition("=")
        flag = RUNNER_FLAGS.get(name)
        if flag is None:
            kept.append(argv[index])
        elif flag.value is None and equals:
            raise AblationError(f"{name} takes no value")
        elif flag.value is not None and not equals:
            if index + 1 >= len(argv):
                raise AblationError(f"{name} needs a value ({flag.value})")
            values[name].append(argv[index + 1])
            index += 1
        elif flag.value is not None:
            values[name].append(inline)
        index += 1
    return kept, values


def _select(ablation: Ablation, selection: list[str]) -> list[str]:
    unknown = [arm for arm in selection if arm not in ablation.arms]
    if unknown:
        raise AblationError(
            f"{ablation.path}: unknown arm(s) {', '.join(map(repr, unknown))}; the arms are: {', '.join(ablation.arms)}"
        )
    chosen = set(selection)
    return [arm for arm in ablation.arms if arm in chosen] if selection else list(ablation.arms)
