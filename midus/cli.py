"""``python -m midus fit|validate|test|predict --config <yaml>``: the kit's LightningCLI.

A ``--config`` YAML with a top-level ``ablation:`` section runs each of its arms as a
separate ``fit`` (see `midus.ablation`). The kit's own commands (analyses of a checkpoint,
zero-shot evaluation, reports of an experiment folder) are listed in `KIT_COMMANDS`; each
is a module with a ``main(args)`` and its own ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from jsonargparse import set_parsing_settings

from midus.training import CausalLM, LanguageModelingData
from midus.training.callbacks import CompletionWriter
from midus.training.run_summary import RunSummary

# Field docstrings of the config dataclasses become --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class MidusCLI(LightningCLI):
    """LightningCLI with the data's vocabulary size linked into the model config.

    Every ``fit`` gets a `RunSummary` callback (``summary.json`` in the run directory) unless
    the config lists one already.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def before_fit(self) -> None:
        # Added here rather than as a parser default so that a YAML's callbacks list (which
        # replaces defaults) cannot drop it, and validate/test/predict never see it.
        config = self.config.get(str(self.subcommand), self.config)  # un-nested when built with run=False
        config_paths = [str(path) for path in config.get("config") or [] if path is not None]
        summaries = [cb for cb in self.trainer.callbacks if isinstance(cb, RunSummary)]
        if not summaries:
            self.trainer.callbacks.append(RunSummary(config_paths))
        for summary in summaries:
            summary.config_paths = summary.config_paths or config_paths

    def before_predict(self) -> None:
        self.trainer.callbacks.append(CompletionWriter())


def cli_kwargs() -> dict[str, Any]:
    """The arguments `main` builds `MidusCLI` with (the ablation runner parses arms with the same)."""
    return {
        "model_class": CausalLM,
        "datamodule_class": LanguageModelingData,
        "auto_configure_optimizers": False,
        # Re-running a variant overwrites its saved config instead of refusing to start.
        "save_config_kwargs": {"overwrite": True},
    }


# Command -> (module with main(args), one line for the top-level help). Imported on use only,
# so ``fit`` never pays for matplotlib or lm_eval.
KIT_COMMANDS: dict[str, tuple[str, str]] = {
    "head-importance": ("midus.analysis.head_importance", "loss increase per memory head when it is zeroed, and gradient x activation"),
    "fixed-retrieval": ("midus.analysis.fixed_retrieval", "fit HIVE / shared-table / dense-FFN values on recorded retrieval"),
    "memory-usage": ("midus.analysis.memory_report", "slot usage, KL from uniform and access histograms per memory head"),
    "lm-eval": ("midus.evaluation.lm_eval_adapter", "zero-shot evaluation of a checkpoint with the lm-evaluation-harness"),
    "report": ("midus.report", "report.md with the summary table and plots of an experiment folder"),
}


def _print_kit_commands() -> None:
    print("\nkit commands (each has its own --help):")
    for name, (_, summary) in KIT_COMMANDS.items():
        print(f"  {name:<16} {summary}")


def main(args: list[str] | None = None) -> MidusCLI | None:
    """Entry point of ``python -m midus`` and the ``midus`` console script.

    Returns the CLI of the run, or None after an ablation (which exits non-zero if an arm
    failed) or a kit command.
    """
    from midus.ablation import run_if_ablation

    command_line = sys.argv[1:] if args is None else args
    if not isinstance(command_line, (list, tuple)):  # a dict config: a LightningCLI run
        return MidusCLI(**cli_kwargs(), args=args)
    command_line = list(command_line)
    if command_line and command_line[0] in KIT_COMMANDS:
        importlib.import_module(KIT_COMMANDS[command_line[0]][0]).main(command_line[1:])
        return None
    if command_line in ([], ["-h"], ["--help"]):
        try:
            return MidusCLI(**cli_kwargs(), args=args)
        finally:
            _print_kit_commands()
    if run_if_ablation(command_line):
        return None
    return MidusCLI(**cli_kwargs(), args=args)
