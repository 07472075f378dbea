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
    the config lists one already. With ``model.compile: true`` and ``trainer.deterministic`` unset,
    the Trainer gets ``deterministic: warn`` (see `before_instantiate_classes`).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Compiled runs get Lightning's ``trainer.deterministic: warn`` unless the config sets it.

        Why compiled runs need it: `CausalLM`'s ``compile`` docs. ``warn`` rather than ``true``: an
        op without a deterministic kernel warns instead of stopping the run. The value lands in the
        saved config.
        """
        config = self._subcommand_config()
        if config["model"]["compile"] and config["trainer"]["deterministic"] is None:
            config["trainer"]["deterministic"] = "warn"

    def _subcommand_config(self):
        """The running subcommand's config (the whole config when built with ``run=False``)."""
        return self.config.get(str(self.subcommand), self.config)

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` with the kit's safe reader before Lightning reads it.

        LightningCLI loads the file here, for its hyperparameters, before anything is
        instantiated or written; the Trainer loads it again when the run starts. Checking it
        first makes a missing, corrupt, truncated, foreign or unsafe file one `CheckpointError`
        (or FileNotFoundError) naming it, and both of Lightning's loads stay weights-only
        unless ``MIDUS_TRUST_CHECKPOINTS=1`` (`midus.checkpoint.safe_load`).
        """
        import torch

        from midus.checkpoint.kit import read_kit_checkpoint
        from midus.checkpoint.safe_load import TRUST_ENV, CheckpointError, kit_safe_globals, trusted, trusted_globals

        subcommand = self.config.get("subcommand")
        config = self.config.get(str(subcommand)) if subcommand else None
        ckpt_path = str(config.get("ckpt_path") or "") if config is not None else ""
        if not ckpt_path:
            return super()._parse_ckpt_path()
        # Checkpoints written by a plain Trainer hold the kit's config dataclasses: allow them
        # in Lightning's own weights-only loads too (every kit class is imported here).
        torch.serialization.add_safe_globals(kit_safe_globals())
        if trusted():
            config["weights_only"] = False
        elif config.get("weights_only") is False:
            raise CheckpointError(
                f"--weights_only=false unpickles arbitrary objects, which could run code; set {TRUST_ENV}=1 "
                "to read a checkpoint you trust that way"
            )
        else:
            config["weights_only"] = True  # also for URLs, which Lightning would otherwise fully unpickle
        special = ckpt_path.lower() in ("best", "last", "hpc", "registry") or ckpt_path.lower().startswith("registry:")
        if special or "://" in ckpt_path:
            return super()._parse_ckpt_path()  # resolved or fetched by the Trainer, which loads it weights-only
        # Its step tells TensorBoard what to purge on resume (before_fit).
        self._checkpoint_step = read_kit_checkpoint(ckpt_path, "--ckpt_path", mmap=not trusted()).get("global_step")
        with torch.serialization.safe_globals(trusted_globals(ckpt_path) if trusted() else []):
            super()._parse_ckpt_path()

    def before_fit(self) -> None:
        # Added here rather than as a parser default so that a YAML's callbacks list (which
        # replaces defaults) cannot drop it, and validate/test/predict never see it.
        config = self._subcommand_config()
        config_paths = [str(path) for path in config.get("config") or [] if path is not None]
        summaries = [cb for cb in self.trainer.callbacks if isinstance(cb, RunSummary)]
        if not summaries:
            self.trainer.callbacks.append(RunSummary(config_paths))
        for summary in summaries:
            summary.config_paths = summary.config_paths or config_paths
        self._purge_steps_after_the_checkpoint()

    def _purge_steps_after_the_checkpoint(self) -> None:
        """On resume, have TensorBoard drop what the interrupted run logged after its checkpoint.

        A preempted run logged steps past its newest checkpoint; the resumed run logs them again
        into the same run directory. A SummaryWriter opened with ``purge_step`` tells TensorBoard
        to discard earlier events from that step on, so every curve shows each step once.
        """
        from lightning.pytorch.loggers import TensorBoardLogger

        # Set when _parse_ckpt_path read a --ckpt_path file (not for "last", a URL, or no resume).
        step = getattr(self, "_checkpoint_step", None)
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and isinstance(step, int):
                # Passed on to its SummaryWriter; the CLI fills in the writer's own None default.
                if logger._kwargs.get("purge_step") is None:
                    logger._kwargs["purge_step"] = step

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
