"""Ablations: the "arms" of one experiment YAML, each a full ``fit`` run in a process of its own.

What a user sees (the YAML's ``ablation:`` section, seeds, references and controls, ``--arm``,
``--fresh``, ``--tune``, ``--jobs``, rerunning after a preemption) is in docs/ablations.md.
`run_ablation` does, for a `CommandLine` (`midus.ablation.command_line`):

1. parses every selected arm's merged config through the kit's LightningCLI parser (no data
   preparation), so a misspelt key or a bad value fails with the arm's name before anything is
   written (a key that moved fails earlier, naming its new place: `midus.moved_keys`);
2. decides per arm and seed whether it is skipped, resumed or started fresh
   (`midus.ablation.resume`), again before anything is written;
3. runs ``python -m midus fit --config <run dir>/arm_config.yaml [args] [--ckpt_path C]`` per
   run, one at a time with the terminal's output or ``jobs`` at a time (`run_launches`: each
   run's output in ``<run dir>/fit.log`` and the CPU threads split between them); a failed run
   does not stop the others, and the exit status is non-zero at the end if one failed;
4. reads every run's ``summary.json`` (ones run earlier or elsewhere included) and writes the
   tables and TensorBoard HParams sessions (`midus.ablation.results`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from midus.ablation.command_line import ARM_FLAG, FRESH_FLAG, SEEDS_FLAG, CommandLine, parse_command_line
from midus.ablation.config import TENSORBOARD, AblationError
from midus.ablation.results import hparams_of_arm, metrics_of_record, write_hparams, write_tables
from midus.ablation.resume import SKIP, ArmStart, plan_start
from midus.ablation.tuning import TUNING_FILE, tuned_arms, tuning_ablation, write_tuning
from midus.report.table import ArmRow, collect_rows
from midus.run_files import ARM_CONFIG, RUNS_AT_A_TIME_ENV, run_label, value_at

CKPT_FLAG = "--ckpt_path"


# Running the runs: one at a time, or several as child processes.

LOG_FILE = "fit.log"
_POLL_S = 0.5


@dataclass
class Launch:
    """One run to start: its label, and `begin`, which prepares its directory and returns the
    ``python -m midus`` arguments to run, or None when the run is skipped."""

    label: str
    run_dir: Path
    begin: Callable[[], list[str] | None]


def child_environment(jobs: int, environment: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child run when `jobs` run at a time: thread counts split between them,
    and `RUNS_AT_A_TIME_ENV` = `jobs` for its summary."""
    environment = dict(os.environ if environment is None else environment)
    environment[RUNS_AT_A_TIME_ENV] = str(jobs)
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            environment.setdefault(name, threads)
    return environment


def run_launches(
    launches: list[Launch],
    jobs: int,
    run_inline: Callable[[list[str]], int],
    on_failure: Callable[[str, int], None],
    exit_codes: dict[str, int],
    program: list[str] | None = None,
) -> None:
    """Run `launches` in order, at most `jobs` at a time; fills in `exit_codes`, each ended run's
    exit status by label (filled as runs end, so an interrupted call leaves those).

    One at a time, `run_inline` runs a run's arguments with the terminal's output. `on_failure`
    is called with the label and status of each run that fails, as it ends. Several at a time,
    each run is `program` (default ``python -m midus``) with its arguments. An
    interruption (Ctrl-C) terminates the runs still going, which resume from their newest
    checkpoints when the same command runs again.
    """
    if jobs <= 1:
        for launch in launches:
            arguments = launch.begin()
            if arguments is None:
                continue
            exit_codes[launch.label] = run_inline(arguments)
            if exit_codes[launch.label]:
                on_failure(launch.label, exit_codes[launch.label])
        return
    program = program or [sys.executable, "-m", "midus"]
    environment = child_environment(jobs)
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    pending = list(launches)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                launch = pending.pop(0)
                arguments = launch.begin()
                if arguments is None:
                    continue
                log_path = launch.run_dir / LOG_FILE
                log = open(log_path, "a", encoding="utf-8")  # appended: a resumed run keeps its earlier log
                process = subprocess.Popen(
                    [*program, *arguments], stdout=log, stderr=subprocess.STDOUT, env=environment
                )
                running[launch.label] = (process, log)
                print(f"=== run {launch.label} started, output in {log_path}", flush=True)
            time.sleep(_POLL_S)
            for label, (process, log) in list(running.items()):
                status = process.poll()
                if status is None:
                    continue
                log.close()
                del running[label]
                exit_codes[label] = status
                print(f"=== run {label} ended with exit status {status}", flush=True)
                if status:
                    on_failure(label, status)
    finally:
        for process, log in running.values():
            process.terminate()
            process.wait()
            log.close()


@dataclass
class ArmPlan:
    """A validated run of an arm (with one of the ablation's seeds, or its only run): its full
    config and the directory it logs to."""

    arm: str
    config: dict[str, Any]
    run_dir: Path
    seed: int | None = None

    @property
    def label(self) -> str:
        """``arm`` or ``arm/seed<k>``: the run's folder below the experiment's."""
        return run_label(self.arm, self.seed)

    @property
    def experiment_dir(self) -> Path:
        """``<save_dir>/<ablation name>``: where the tables go."""
        return self.run_dir.parent if self.seed is None else self.run_dir.parent.parent


def plan_arm(command: CommandLine, arm: str, seed: int | None = None) -> ArmPlan:
    """Validate one run without building anything: parse it as it will run and build its `ModelConfig`.

    Raises:
        AblationError: naming the arm and the offending key or value.
    """
    from argparse import ArgumentError

    from midus.model import ModelConfig
    from midus.training.cli import parse_only
    from midus.training.config import GROUPS

    ablation = command.ablation
    config = ablation.arm_config(arm, seed)
    label = run_label(arm, seed)
    # The config goes in as a YAML string (jsonargparse takes those for --config): nothing is written yet.
    args = command.for_arm(yaml.safe_dump(config, sort_keys=False))
    try:
        parsed = parse_only(args)
        ModelConfig(**parsed.model.config.as_dict())
        for name, group in GROUPS.items():  # each checks its own values (model.optimizer.learning_rate > 0, ...)
            group(**parsed.model[name].as_dict())
    except (ArgumentError, ValueError, TypeError) as error:
        raise AblationError(f"{ablation.path}: arm {arm!r}: {error}") from error
    logger = parsed.trainer.logger
    init_args = logger.init_args if getattr(logger, "class_path", "") == TENSORBOARD else None
    if init_args is None or (init_args.name, str(init_args.version)) != (ablation.name, label):
        raise AblationError(
            f"{ablation.path}: arm {arm!r}: the runner sets trainer.logger to {TENSORBOARD} with "
            f"name={ablation.name!r}, version={label!r}; do not override them on the command line (use ablation.name)"
        )
    return ArmPlan(arm, config, Path(init_args.save_dir) / ablation.name / label, seed)


def run_arm_process(arm_command: list[str]) -> int:
    """Run one arm as ``python -m midus <arm_command>`` in a child process, the only run at a time
    (its summary says so: `child_environment`); returns its exit status."""
    return subprocess.run([sys.executable, "-m", "midus", *arm_command], env=child_environment(1)).returncode


def run_ablation(command: CommandLine | Sequence[str]) -> int:
    """Run the arms an ablation command line selects, then write the table; returns the exit status.

    `command` is the parsed command line (``python -m midus`` parses it once: `midus.cli`), or the
    arguments to parse (a Python caller's).

    Raises:
        AblationError: when the command line names no ablation YAML, an unknown arm, or an invalid
            arm (always before anything is written).
    """
    if not isinstance(command, CommandLine):
        parsed = parse_command_line(command)
        if parsed is None:
            raise AblationError("no --config names an ablation YAML (one with a top-level 'ablation:' section)")
        command = parsed
    tuned, arms_tuned = (command.ablation, tuned_arms(command.ablation, command.arms)) if command.tune else (None, [])
    if tuned is not None:  # the tuning runs, as an ablation of their own (`midus.ablation.tuning`)
        tuning = tuning_ablation(tuned, command.arms)
        command = dataclasses.replace(command, ablation=tuning, arms=list(tuning.arms))
    ablation = command.ablation
    if command.subcommand != "fit":
        raise AblationError(
            f"{ablation.path}: only 'fit' runs the arms of an ablation (got {command.subcommand!r}); to "
            f"{command.subcommand or 'validate'} one arm, give the config its fit saved: "
            f"--config <save_dir>/{ablation.name}/<arm>/config.yaml"
        )
    if any(arg.partition("=")[0] == CKPT_FLAG for arg in [*command.before, *command.after]):
        raise AblationError(
            f"{ablation.path}: the runner chooses each arm's {CKPT_FLAG} (it resumes an interrupted arm from its "
            f"newest checkpoint); to start every arm from one trained model, set model.upscale.base_checkpoint"
        )
    printing = command.print_config
    plans = []
    for arm, seed in [(arm, seed) for arm in command.arms for seed in command.seeds]:
        if printing:
            print(f"# Ablation {ablation.name!r}, run {run_label(arm, seed)!r}:", flush=True)
        try:
            plans.append(plan_arm(command, arm, seed))
        except SystemExit as stop:  # the parser exits after --print_config (and --help)
            if not printing or stop.code:
                raise
    if printing:
        return 0  # every arm's resolved config is printed; run nothing
    experiment_dirs = {plan.experiment_dir for plan in plans}
    if len(experiment_dirs) > 1:
        raise AblationError(f"{ablation.path}: arms log under different save_dirs: {sorted(map(str, experiment_dirs))}")
    starts = plan_starts(command, plans)
    # Every selected arm is valid and its start decided: from here on files are written.

    def begin(number: int, plan: ArmPlan, start: ArmStart) -> list[str] | None:
        print(
            f"\n=== ablation {ablation.name}: arm {plan.label} ({number}/{len(plans)}) -> {plan.run_dir}: "
            f"{start.describe()}",
            flush=True,
        )
        for warning in start.warnings:
            print(f"=== arm {plan.label}: not resuming from unreadable {warning}", file=sys.stderr, flush=True)
        if start.action == SKIP:
            return None
        arm_command = command.for_arm(str(plan.run_dir / ARM_CONFIG))
        seed_note = "" if plan.seed is None else f", seed {plan.seed}"
        header = f"# Arm {plan.arm!r}{seed_note} of {ablation.path} (ablation {ablation.name!r}).\n"
        start.prepare(header, plan.config, arm_command)
        return start.arm_command(arm_command)

    def report_failure(label: str, status: int) -> None:
        print(
            f"=== arm {label} failed with exit code {status}; rerunning this command "
            "resumes it from its newest checkpoint, if it wrote one",
            file=sys.stderr,
            flush=True,
        )

    launches = [
        Launch(plan.label, plan.run_dir, functools.partial(begin, number, plan, start))
        for number, (plan, start) in enumerate(zip(plans, starts), 1)
    ]
    exit_codes: dict[str, int] = {}
    try:
        # A process per run: peak memory is the run's own, and a crash ends only that run. The lambda
        # looks run_arm_process up at call time, where tests replace it.
        run_launches(launches, command.jobs, lambda arguments: run_arm_process(arguments), report_failure, exit_codes)
    finally:  # an interrupted ablation still gets the table of what finished
        experiment_dir = experiment_dirs.pop()
        rows = collect_rows(experiment_dir, list(ablation.arms), exit_codes, command.seeds)
        write_run_hparams(command, plans, rows)
        print(f"\nAblation {ablation.name} ({experiment_dir}/summary.md):\n")
        tables = write_tables(experiment_dir, ablation.name, rows, references=ablation.references,
                              control=ablation.control)
        print(tables, flush=True)
        if tuned is not None:
            print(f"\nTuning ({experiment_dir}/{TUNING_FILE}):\n")
            print(write_tuning(experiment_dir, tuned, arms_tuned, rows), flush=True)
    return 1 if any(exit_codes.values()) else 0


def write_run_hparams(command: CommandLine, plans: list[ArmPlan], rows: list[ArmRow]) -> None:
    """Give every selected run with a summary its TensorBoard HParams session (`midus.ablation.results`):
    the arm's overridden fields, its seed and key config values, against its final metrics."""
    records = {row.label: row.record for row in rows if row.record is not None}
    for plan in plans:
        record = records.get(plan.label)
        if record is None:
            continue
        hparams = hparams_of_arm(plan.arm, plan.seed, command.ablation.arms[plan.arm], plan.config)
        write_hparams(plan.run_dir, hparams, metrics_of_record(record), int(value_at(record, "train.steps") or 0))


def plan_starts(command: CommandLine, plans: list[ArmPlan]) -> list[ArmStart]:
    """How each arm starts (skip, resume, fresh), decided before anything is written.

    Raises:
        AblationError: naming every arm whose run directory holds a run of another
            configuration (or one that cannot be resumed); the message says to pass ``--fresh``.
    """
    starts, refused, refused_plans = [], {}, []
    for plan in plans:
        arm_command = command.for_arm(str(plan.run_dir / ARM_CONFIG))
        try:
            starts.append(plan_start(plan.run_dir, plan.config, arm_command, command.fresh))
        except AblationError as error:
            refused[plan.label] = f"{command.ablation.path}: arm {plan.label!r}: {error}"
            refused_plans.append(plan)
    if refused:  # one error for all of them: the user fixes the command once
        which = "that arm" if len(refused) == 1 else "those arms"
        arms = ",".join(dict.fromkeys(plan.arm for plan in refused_plans))
        seeds = sorted({plan.seed for plan in refused_plans if plan.seed is not None})
        seed_flag = f" {SEEDS_FLAG} {','.join(map(str, seeds))}" if seeds else ""
        hint = f"({ARM_FLAG} {arms}{seed_flag} {FRESH_FLAG} restarts only {which})"
        raise AblationError("\n".join([*refused.values(), hint]))
    return starts
