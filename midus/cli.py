"""``python -m midus``: dispatch to a kit command, an ablation, or the LightningCLI.

* ``fit|validate|test|predict --config <yaml>``: the kit's LightningCLI (`midus.training.cli`);
* ``fit --config <ablation yaml>``: a YAML with a top-level ``ablation:`` section runs each of
  its arms as a separate ``fit`` (`midus.ablation.runner`);
* the kit's own commands in `KIT_COMMANDS` (analyses of a checkpoint, zero-shot evaluation,
  reports of an experiment folder): each is a module with a ``main(args)`` and its own
  ``--help``.

Everything is imported on use: ``report`` and every kit command's ``--help`` never import
Lightning, and ``fit`` never pays for matplotlib or lm_eval.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

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
}


def _print_kit_commands() -> None:
    print("\nkit commands (each has its own --help):")
    for name, (_, summary) in KIT_COMMANDS.items():
        print(f"  {name:<16} {summary}")


def main(args: list[str] | dict[str, Any] | None = None) -> Any:
    """Entry point of ``python -m midus`` and the ``midus`` console script.

    Returns the `MidusCLI` of a LightningCLI run, or None after an ablation (which exits
    non-zero if an arm failed) or a kit command.
    """
    command_line = sys.argv[1:] if args is None else args
    if isinstance(command_line, (list, tuple)) and command_line and command_line[0] in KIT_COMMANDS:
        importlib.import_module(KIT_COMMANDS[command_line[0]][0]).main(list(command_line[1:]))
        return None

    from midus.ablation.runner import run_if_ablation
    from midus.training.cli import MidusCLI, cli_kwargs
    from midus.training.divergence import EXIT_CODE, NonFiniteLossError

    if not isinstance(command_line, (list, tuple)):  # a dict config: a LightningCLI run
        return MidusCLI(**cli_kwargs(), args=args)
    command_line = list(command_line)
    if command_line in ([], ["-h"], ["--help"]):
        try:
            return MidusCLI(**cli_kwargs(), args=args)
        finally:
            _print_kit_commands()
    if run_if_ablation(command_line):
        return None
    try:
        return MidusCLI(**cli_kwargs(), args=args)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CODE) from None
