"""``python -m midus``: dispatch to a kit command, an ablation, or the LightningCLI.

* ``fit|validate|test|predict --config <yaml>``: the kit's LightningCLI (`midus.training.cli`);
* ``fit --config <ablation yaml>``: a YAML with a top-level ``ablation:`` section runs each of
  its arms as a separate ``fit`` (`midus.ablation.runner`);
* the kit's own commands in `KIT_COMMANDS` (analyses of a checkpoint, zero-shot evaluation,
  reports of an experiment folder): each is a module with a ``main(args)`` and its own
  ``--help``.

Everything is imported on use: ``report`` and every kit command's ``--help`` never import
Lightning, and ``fit`` never pays for matplotlib or lm_eval.

Bad input is one line, ``error: <message naming the field or file>``, and exit status 2
(`USER_ERROR_EXIT`): a wrong config value, a missing or unreadable file, a corrupt,
truncated, foreign or unsafe checkpoint (`is_user_error` says which exceptions count). The
traceback is printed too with ``MIDUS_DEBUG=1`` (`DEBUG_ENV`). A diverged run exits 3.

The kit's log lines (logger ``midus``: prepared data, packed blocks, up-scaled parameter
counts) go to stderr at INFO, ``MIDUS_LOG_LEVEL`` (`LOG_LEVEL_ENV`) setting another level
(`configure_logging`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

# Command -> (module with main(args), one line for the top-level help).
KIT_COMMANDS: dict[str, tuple[str, str]] = {
    "head-importance": (
        "midus.analysis.head_importance",
        "loss increase per memory head when it is zeroed, and gradient x activation",
    ),
    "fixed-retrieval": (
        "midus.analysis.fixed_retrieval",
        "fit HIVE / shared-table / dense-FFN values on recorded retrieval",
    ),
    "memory-usage": (
        "midus.analysis.memory_report",
        "slot usage, KL from uniform and access histograms per memory head",
    ),
    "lm-eval": (
        "midus.evaluation.lm_eval_command",
        "zero-shot evaluation of a checkpoint with the lm-evaluation-harness",
    ),
    "report": ("midus.report.build", "report.md with the summary table and plots of an experiment folder"),
    "prepare": (
        "midus.data.prepare_command",
        "tokenise a fit YAML's text into token shards once (data.format: shards), resumable",
    ),
    "export": (
        "midus.checkpoint.export_command",
        "a checkpoint as a transformers directory (custom code for memory models)",
    ),
}


def _print_kit_commands() -> None:
    print("\nkit commands (each has its own --help):")
    for name, (_, summary) in KIT_COMMANDS.items():
        print(f"  {name:<16} {summary}")


USER_ERROR_EXIT = 2
DEBUG_ENV = "MIDUS_DEBUG"
"""Environment variable: ``1`` prints the traceback of a user error before its ``error:`` line."""
_PACKAGE = Path(__file__).resolve().parent


def is_user_error(error: BaseException) -> bool:
    """Whether `error` reports bad input (one ``error:`` line) rather than a bug (a traceback).

    Bad input is a ValueError or OSError that the kit raised itself (the innermost frame of
    its traceback is in the ``midus`` package): the kit's messages name the config field or
    file and what was expected. An OSError carrying a file name (missing, unreadable) counts
    wherever it was raised. Everything else, the same types raised inside a library included,
    keeps its traceback.
    """
    if isinstance(error, OSError) and error.filename is not None:
        return True
    if not isinstance(error, (ValueError, OSError)):
        return False
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def report_user_error(error: BaseException) -> NoReturn:
    """Print `error` as one ``error:`` line (after its traceback with `DEBUG_ENV`) and exit 2."""
    if _debug():
        traceback.print_exception(error)
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT) from None


LOG_LEVEL_ENV = "MIDUS_LOG_LEVEL"
"""Environment variable: the lowest level of the kit's log lines shown (default ``INFO``;
``WARNING`` quiets the INFO lines, ``DEBUG`` adds debug lines)."""
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
"""Format of the kit's log lines on stderr: level, logger and message, no timestamp."""
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _KitStderrHandler(logging.StreamHandler):
    """Writes each record to the `sys.stderr` of the moment (as `logging.lastResort` does), not the
    one of its creation: it is installed once per process, and stderr may be replaced after that
    (pytest's capture, a caller's redirect)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # not StreamHandler's: it would store a stream

    @property
    def stream(self) -> Any:  # the attribute StreamHandler.emit and .flush write to
        return sys.stderr


def configure_logging() -> None:
    """Show the kit's log lines (logger ``midus``) on stderr at `LOG_LEVEL_ENV`'s level (INFO).

    As Lightning does for ``lightning.pytorch``: the level is set on the kit's logger alone (the
    root logger is left as it is, so libraries stay quiet), and a handler is added only when the
    root logger has none; a program that configured logging itself gets the kit's records
    through its own handlers instead. The handler is added once per process: calling this again
    (``main`` several times in one process) adds no second handler, so no line shows twice.
    """
    name = os.environ.get(LOG_LEVEL_ENV, "").strip().upper() or "INFO"
    if name not in _LOG_LEVELS:
        raise ValueError(f"{LOG_LEVEL_ENV}={os.environ[LOG_LEVEL_ENV]!r} is not a log level; use one of {_LOG_LEVELS}")
    logger = logging.getLogger("midus")
    logger.setLevel(name)
    if any(isinstance(handler, _KitStderrHandler) for handler in logger.handlers):
        return
    if logging.getLogger().hasHandlers():
        return
    handler = _KitStderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    # Not also to the root logger: a handler it gets later (a library's basicConfig) would print every line twice.
    logger.propagate = False


def main(args: list[str] | dict[str, Any] | None = None) -> Any:
    """Entry point of ``python -m midus`` and the ``midus`` console script.

    Returns the `MidusCLI` of a LightningCLI run, or None after an ablation (which exits
    non-zero if an arm failed) or a kit command. Bad input exits 2 (see the module docstring).
    The kit's log lines show on stderr (`configure_logging`).
    """
    try:
        configure_logging()
        return _dispatch(args)
    except SystemExit as stop:
        # Kit commands print their own error line and exit 2 while handling the error, so it
        # is the exit's context: its traceback is still there to show.
        context = stop.__context__
        if _debug() and stop.code == USER_ERROR_EXIT and isinstance(context, Exception):
            traceback.print_exception(context)
        raise
    except Exception as error:
        if not is_user_error(error):
            raise
        report_user_error(error)


def _dispatch(args: list[str] | dict[str, Any] | None) -> Any:
    command_line = sys.argv[1:] if args is None else args
    if isinstance(command_line, (list, tuple)) and command_line and command_line[0] in KIT_COMMANDS:
        importlib.import_module(KIT_COMMANDS[command_line[0]][0]).main(list(command_line[1:]))
        return None

    from midus.host_allocator import keep_freed_memory
    from midus.moved_keys import MOVED_KEYS, check_config, check_moved_keys
    from midus.training.cli import MidusCLI, cli_kwargs
    from midus.training.divergence import EXIT_CODE, NonFiniteLossError

    if not isinstance(command_line, (list, tuple)):  # a dict config: a LightningCLI run
        keep_freed_memory()  # a training step's freed memory is reused, not faulted in again
        if isinstance(command_line, dict):
            check_config(command_line, MOVED_KEYS, "args")
        return MidusCLI(**cli_kwargs(), args=args)
    command_line = list(command_line)
    if command_line in ([], ["-h"], ["--help"]):
        try:
            return MidusCLI(**cli_kwargs(), args=args)
        finally:
            _print_kit_commands()
    check_moved_keys(command_line, MOVED_KEYS)  # before any parsing: a moved key is one line naming its new place
    if _run_if_ablation(command_line):
        return None
    keep_freed_memory()  # (not in the ablation runner's process: each arm's fit is a process of its own)
    try:
        return MidusCLI(**cli_kwargs(), args=args)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None


def _run_if_ablation(command_line: list[str]) -> bool:
    """Run the arms of the ablation YAML a ``--config`` names, each a fit of its own; False when none does.

    The command line is parsed once (`midus.ablation.command_line`): the runner's flags, and the
    arguments every arm's fit gets. A plain fit (`_may_be_ablation` says no) never enters the
    ablation package. A configuration error exits 2 with its one ``error:`` line (the error stays
    the exit's cause); an arm that failed makes the exit status 1, after the table.
    """
    from midus.ablation.command_line import CONFIG_FLAGS, RUNNER_FLAGS, parse_command_line
    from midus.ablation.config import AblationError

    if not _may_be_ablation(command_line, CONFIG_FLAGS, RUNNER_FLAGS):
        return False
    try:
        command = parse_command_line(command_line)
        if command is None:
            return False
        from midus.ablation.runner import run_ablation

        status = run_ablation(command)
    except AblationError as error:
        print(f"error: {error}", file=sys.stderr)  # as it is: a refusal of several arms spans lines
        raise SystemExit(USER_ERROR_EXIT) from error
    if status:
        raise SystemExit(status)
    return True


def _may_be_ablation(command_line: list[str], config_flags: tuple[str, ...], runner_flags: dict) -> bool:
    """Whether the ablation runner must read `command_line`: a runner flag (refused without an
    ablation YAML), or a ``--config`` file whose top level has an ``ablation:`` key. Anything else is
    a plain LightningCLI run, which reports unreadable configs itself."""
    import yaml

    for index, arg in enumerate(map(str, command_line)):
        flag, equals, inline = arg.partition("=")
        if flag in runner_flags:
            return True
        if flag not in config_flags:
            continue
        value = inline if equals else (str(command_line[index + 1]) if index + 1 < len(command_line) else "")
        try:
            document = yaml.safe_load(Path(value).read_text(encoding="utf-8")) if Path(value).is_file() else None
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue
        if isinstance(document, dict) and "ablation" in document:
            return True
    return False
