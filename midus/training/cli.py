"""The kit's LightningCLI: ``fit``, ``validate``, ``test`` and ``predict`` of a `CausalLM` on a
`LanguageModelingData`, with the data's vocabulary size linked into the model config."""

from __future__ import annotations

from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from midus.data.datamodule import LanguageModelingData
from midus.training.callbacks import CompletionWriter
from midus.training.lm_module import CausalLM
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
    """The arguments ``python -m midus`` builds `MidusCLI` with (the ablation runner parses arms with the same)."""
    return {
        "model_class": CausalLM,
        "datamodule_class": LanguageModelingData,
        "auto_configure_optimizers": False,
        # Re-running a variant overwrites its saved config instead of refusing to start.
        "save_config_kwargs": {"overwrite": True},
    }
