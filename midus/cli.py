"""``python -m midus fit|validate|test|predict --config <yaml>``: the kit's LightningCLI."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from jsonargparse import set_parsing_settings

from midus.training import CausalLM, LanguageModelingData
from midus.training.callbacks import CompletionWriter

# Field docstrings of the config dataclasses become --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class MidusCLI(LightningCLI):
    """LightningCLI with the data's vocabulary size linked into the model config."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def before_predict(self) -> None:
        self.trainer.callbacks.append(CompletionWriter())


def main(args: list[str] | None = None) -> MidusCLI:
    """Entry point of ``python -m midus`` and the ``midus`` console script."""
    return MidusCLI(
        CausalLM,
        LanguageModelingData,
        auto_configure_optimizers=False,
        # Re-running a variant overwrites its saved config instead of refusing to start.
        save_config_kwargs={"overwrite": True},
        args=args,
    )
