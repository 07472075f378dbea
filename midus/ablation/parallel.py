"""Running an ablation's runs as child processes, one at a time or ``--jobs N`` at a time.

One at a time, a run's output goes to the terminal as it would for a single ``fit``. Several at
a time, each run writes its output to ``<run dir>/fit.log`` (interleaved progress bars say
nothing) and the runner prints one line as each starts and ends. Each child then gets
``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) = CPU cores // N unless the environment already
sets them: N runs with every core each would fight over the cores and all run slower.
Several runs at a time suit CPU-bound small models; on one GPU, run one at a time.

Every child also gets ``MIDUS_RUNS_AT_A_TIME`` = N (`midus.run_files.RUNS_AT_A_TIME_ENV`), which
its ``summary.json`` records under ``timing``, so the tables can say how step times were measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from midus.run_files import RUNS_AT_A_TIME_ENV

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
