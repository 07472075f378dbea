"""Ablations: the "arms" of one experiment YAML, each a full ``fit`` run in its own process.

A YAML with a top-level ``ablation:`` section is an ablation; everything else in it is the
shared base configuration::

    # python -m midus fit --config experiments/ablate_width.yaml
    ablation:
      name: ablate_width                  # optional; default: the YAML file's stem
      arms:
        wide:
          model.config.d_model: 64        # dotted keys (at the top level of an arm) ...
        narrow:
          model: {config: {d_model: 32}}  # ... or nested dicts
        base: {}                          # the base as is
    seed_everything: 0
    trainer: {...}
    model: {...}
    data: {...}

Each arm's overrides are deep-merged onto the base: mappings merge key by key, lists and
scalars replace. The runner then sets the logger to TensorBoard with ``name=<ablation name>``
and ``version=<arm>`` (``save_dir`` from the base's TensorBoardLogger, default ``runs``), so
arm ``wide`` lands in ``runs/ablate_width/wide``.

``python -m midus fit --config experiments/ablate_width.yaml [--arm NAME[,NAME...]] [--fresh] [args]``:

1. selects the arms (``--arm``, repeatable and/or comma-separated; default: all, in YAML order);
2. parses every selected arm's merged config, with ``args``, through the kit's LightningCLI
   parser (no data preparation) and builds its `ModelConfig` and training groups
   (`midus.training.config`), so a misspelt key or a bad value fails with the arm's name before
   anything is written (a key that moved fails earlier, naming its new place:
   `midus.moved_keys`);
3. decides per arm whether it is skipped, resumed or started fresh (Rerunning, below), again
   before anything is written, and prints that as it reaches the arm;
4. runs ``python -m midus fit --config runs/<name>/<arm>/arm_config.yaml [args] [--ckpt_path C]``
   per arm, one after the other; ``arm_config.yaml`` is base + overrides + logger, and ``args``
   come after it, so they override it (``--trainer.max_steps 10``);
5. keeps going when an arm fails (a crash, or exit 3 for a diverged loss), and exits non-zero
   at the end if one did;
6. reads ``runs/<name>/<arm>/summary.json`` of every arm in the YAML (ones run earlier or on
   other machines included), prints a Markdown table and writes ``runs/<name>/summary.md`` and
   ``summary.csv`` (`midus.report.summary_files`), and gives every selected run with a summary a
   TensorBoard HParams session (`midus.ablation.hparams`): ``tensorboard --logdir runs/<name>``
   shows the ablation as one HParams table, filterable by arm and seed.

Seeds: ``ablation.seeds: [0, 1, 2]`` (or ``--seeds 0,1,2``, which replaces it) runs every arm once
per seed, with ``seed_everything: <seed>`` (initialisation and data order; the embedded corpus
keeps its own ``data.embedded.seed``, so every seed trains on the same people), in
``runs/<name>/<arm>/seed<seed>``; each seed is its own run for skipping and resuming. The table
then gives per arm and metric the mean over seeds with a 95 % Student-t interval
(`midus.report.intervals`), and with ``ablation.reference: <arm>`` every other arm's paired
difference to the reference over the seeds both ran, with a verdict: better, worse, or not
distinguishable (`midus.report.seed_table`). ``summary_seeds.csv`` holds the means and bounds.

With ``ablation.reference: [a, b]`` (a list) every arm gets a paired table against each of them;
``ablation.json`` records the first as the reference ``report`` uses. ``ablation.control: <arm>``
(default: the first reference) is the arm without up-scaling that the "bits above control"
columns subtract, seed by seed: (knowledge bits - the control's) per added and per trainable
parameter (`midus.report.table`); a mapping of control arms to the arms each controls gives
frozen and trainable arms their own (`midus.ablation.config.parse_control`).

Several at a time: ``ablation.jobs: 2`` (or ``--jobs 2``) runs two runs at once, each with its
output in ``<run dir>/fit.log`` and the CPU threads split between them (`midus.ablation.parallel`).

Tuning: ``ablation.tune`` names candidate settings (learning rates, say) and the data the tuning
runs use; ``--tune`` runs every arm once per candidate as the ablation ``<name>_tune`` and writes
``tuning.md`` with each arm's choice (`midus.ablation.tuning`).

Rerunning (`midus.ablation.resume`): the command that started an ablation also continues it
after a preemption, a crash or Ctrl-C. A fresh start records the arm's config
(``arm_config.yaml``) and its arguments (``arm_command.yaml``: ``args``, ``--arm``/``--fresh``
removed) in the arm's directory; a later run compares them with its own, as parsed data (YAML
comments and key order do not count, every argument does; a record written before keys moved is
compared with each key at its new place, `midus.moved_keys`). Per arm:

* finished (a ``summary.json`` its fit wrote, naming this ``arm_config.yaml``): skipped, its
  row comes from that summary;
* checkpoints in ``checkpoints/`` but no finished summary (killed, crashed, diverged): resumed
  with ``--ckpt_path`` of the newest one, the highest ``global_step`` read from the files
  themselves (``last.ckpt`` names no step, copies reset mtimes); the last written wins a tie;
* neither: started fresh (leftovers of an attempt that wrote no checkpoint are removed);
* a summary or checkpoints with a different or missing record: one error naming each such
  arm, before any arm runs; the runner never skips or resumes a different experiment.

``--fresh`` starts the selected arms from step 0: it deletes what their fits wrote (summary,
``config.yaml``, ``hparams.yaml``, TensorBoard event files, ``checkpoints/*.ckpt``) and keeps
anything else in the directory (``analysis/``, notes). It applies to that one invocation:
rerun without it to continue. A ``--ckpt_path`` of its own is refused: the runner picks each
arm's. To train a finished arm longer, resume it by hand (``fit --config
runs/<name>/<arm>/config.yaml --ckpt_path ... --trainer.max_steps N``).

Only ``fit`` takes an ablation YAML. To ``validate``/``test``/``predict`` one arm, give the
``config.yaml`` its run saved (the resolved config, ``args`` included):
``python -m midus validate --config runs/<name>/<arm>/config.yaml --ckpt_path runs/<name>/<arm>/checkpoints/last.ckpt``.
``--print_config`` prints every selected arm's resolved config and runs nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from midus.ablation.command_line import ARM_FLAG, FRESH_FLAG, SEEDS_FLAG, CommandLine, parse_command_line
from midus.ablation.config import TENSORBOARD, AblationError
from midus.ablation.hparams import hparams_of_arm, metrics_of_record, write_hparams
from midus.ablation.parallel import Launch, child_environment, run_launches
from midus.ablation.resume import SKIP, ArmStart, plan_start
from midus.ablation.tuning import TUNING_FILE, tuned_arms, tuning_ablation, write_tuning
from midus.report.summary_files import write_tables
from midus.report.table import ArmRow, collect_rows
from midus.run_files import ARM_CONFIG, run_label, value_at

CKPT_FLAG = "--ckpt_path"


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
    """Give every selected run with a summary its TensorBoard HParams session (`midus.ablation.hparams`):
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
