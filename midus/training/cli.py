"""The kit's LightningCLI: ``fit``, ``validate``, ``test`` and ``predict`` of a `CausalLM` on a
`LanguageModelingData`, with the data's vocabulary size linked into the model config."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from midus.data.datamodule import LanguageModelingData
from midus.data.starting_tokenizer import (
    NEW_TOKENIZERS,
    StartingModel,
    refuse_a_new_tokenizer,
    resolve_tokenizer,
)
from midus.moved_keys import MOVED_KEYS, upgrade_config
from midus.training.callbacks import CompletionWriter
from midus.training.lightning_internals import (
    CheckpointHookCLI,
    cli_parser,
    parse_checkpoint_hparams,
    set_purge_step,
    subcommand_config,
)
from midus.training.lm_module import CausalLM
from midus.training.model_source import StoredModel, building_from_checkpoint
from midus.training.run_summary import RunSummary
from midus.upscale.methods import check_method_name

# Field docstrings of the config dataclasses become --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

ARCHITECTURE_FIELDS = ("config", "pretrained", "upscale")
"""The ``model.*`` sections that say what model is built; with ``--ckpt_path`` the checkpoint decides them."""


def starting_model(model: Namespace) -> StartingModel:
    """The model a run's ``model:`` section starts from."""
    upscale = model["upscale"]
    return StartingModel.of(model["pretrained"], upscale["base_checkpoint"], upscale["base_made_by"])


class MidusCLI(CheckpointHookCLI):
    """LightningCLI with the data's vocabulary size linked into the model config.

    Every ``fit`` gets a `RunSummary` callback (``summary.json`` in the run directory) unless
    the config lists one already. With ``model.compute.compile: true`` and ``trainer.deterministic`` unset,
    the Trainer gets ``deterministic: warn`` (see `before_instantiate_classes`).

    The data's ``tokenizer: auto`` becomes the starting model's own tokenizer (`instantiate_classes`).
    With ``--ckpt_path`` of a kit checkpoint the model is built from the architecture the checkpoint
    stores, so its base may be gone, and ``--model.*`` values given with it are kept or refused
    (`parse_ckpt_path`).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        # The prepared data itself, for model.upscale.memory_allocation: head_importance (not a hyperparameter).
        parser.link_arguments("data", "model.allocation_data", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        self._args = args  # parsed again without defaults by _given_model_values
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """Refuse what cannot train, then fill in what the config leaves to the kit.

        * ``fit`` with ``trainer.precision: bf16-true`` is refused: the weights themselves are
          bfloat16 (8 significant bits), so AdamW's updates, far smaller than the weights, round
          away and the model does not learn (val/loss 7.0312 at steps 2 and 5). ``bf16-mixed``
          computes in bfloat16 and keeps float32 weights; evaluation may keep ``bf16-true``.
        * An unregistered ``model.upscale.method`` is refused before the data is prepared (the field
          is a plain string, checked against `midus.upscale.methods`; `UpscaleConfig` checks it
          again when built).
        * A new ``bpe``/``char`` tokenizer on a pretrained Hugging Face model is refused: its
          embeddings know the base's token ids (a kit ``.ckpt`` base: `_check_base_tokenizer`).
        * Compiled runs get Lightning's ``trainer.deterministic: warn`` unless the config sets it.
          Why compiled runs need it: ``model.compute.compile``'s docs (`midus.training.config.ComputeConfig`).
          ``warn`` rather than ``true``: an op without a deterministic kernel warns instead of stopping
          the run. The value lands in the saved config.
        """
        config = subcommand_config(self)
        if self.subcommand == "fit" and str(config["trainer"]["precision"]) == "bf16-true":
            raise ValueError(
                "trainer.precision=bf16-true keeps the weights in bfloat16, where AdamW's small updates round "
                "away and fit trains nothing; fit with trainer.precision: bf16-mixed (bfloat16 compute, float32 "
                "weights); validate, test and predict may use bf16-true"
            )
        check_method_name(config["model"]["upscale"]["method"])
        refuse_a_new_tokenizer(config["data"]["tokenizer"], starting_model(config["model"]))
        if config["model"]["compute"]["compile"] and config["trainer"]["deterministic"] is None:
            config["trainer"]["deterministic"] = "warn"

    def instantiate_classes(self) -> None:
        """Build the data, model and Trainer, with ``data.tokenizer: auto`` resolved (`resolved_tokenizer`)
        and, after a kit checkpoint's ``--ckpt_path``, the model built from the checkpoint's
        architecture rather than from its base (`midus.training.model_source.building_from_checkpoint`)."""
        data = subcommand_config(self)["data"]
        asked = data["tokenizer"], data["tokenizer_path"]
        data["tokenizer"], data["tokenizer_path"] = self.resolved_tokenizer()
        try:
            with building_from_checkpoint(getattr(self, "_stored_model", None)):
                super().instantiate_classes()
        finally:
            # The saved config.yaml keeps what was asked (auto): a later validate or resume with it
            # resolves it again, from its checkpoint when the base has moved since.
            data["tokenizer"], data["tokenizer_path"] = asked
        self._check_base_tokenizer()

    def resolved_tokenizer(self) -> tuple[str, str]:
        """``(data.tokenizer, data.tokenizer_path)`` the data is built with (`midus.data.starting_tokenizer`);
        ``auto`` after a ``--ckpt_path`` of a kit checkpoint takes the tokenizer that checkpoint stores,
        so the base may be gone."""
        config = subcommand_config(self)
        kind, path = config["data"]["tokenizer"], config["data"]["tokenizer_path"]
        start = starting_model(config["model"])
        if kind == "auto" and not path and start.path and getattr(self, "_checkpoint_has_tokenizer", False):
            return "hf", str(config["ckpt_path"])
        return resolve_tokenizer(kind, path, start)

    def _check_base_tokenizer(self) -> None:
        """A new ``bpe``/``char`` tokenizer on a kit ``.ckpt`` base must be the one the base was
        trained with (the same text and settings train the same one); refuse any other.

        Runs once the data is built and before anything is written. Not with a ``--ckpt_path`` of a
        kit checkpoint: the model is that checkpoint's, whose tokenizer `CausalLM` compares on load.
        """
        config = subcommand_config(self)
        start = starting_model(config["model"])
        field, base, kind = start.field, start.path, config["data"]["tokenizer"]
        if kind not in NEW_TOKENIZERS or field != "model.upscale.base_checkpoint" or not Path(base).is_file():
            return
        if getattr(self, "_stored_model", None) is not None:
            return
        from midus.checkpoint import checkpoint_tokenizer, read_kit_checkpoint
        from midus.data.tokenizers import same_vocabulary

        stored = checkpoint_tokenizer(read_kit_checkpoint(base, field, mmap=True))
        if stored is not None and not same_vocabulary(stored, self.datamodule.tokenizer):
            raise ValueError(
                f"data.tokenizer={kind} trained a tokenizer other than the one {field}={base!r} was trained "
                "with; leave data.tokenizer at auto (the default: the base's tokenizer)"
            )

    def parse_ckpt_path(self, lightning_parses: Callable[[], None]) -> None:
        """Read ``--ckpt_path`` with the kit's safe reader before Lightning reads it, and keep or
        refuse the ``--model.*`` values Lightning would replace with the checkpoint's.

        LightningCLI loads the file here (`lightning_parses`), for its hyperparameters, before anything is
        instantiated or written; the Trainer loads it again when the run starts. Checking it
        first makes a missing, corrupt, truncated, foreign or unsafe file one `CheckpointError`
        (or FileNotFoundError) naming it, and both of Lightning's loads stay weights-only
        unless ``MIDUS_TRUST_CHECKPOINTS=1`` (`midus.checkpoint.safe_load`).

        Lightning parses the checkpoint's hyperparameters over the whole ``model`` section, so on
        its own every ``--model.*`` flag and YAML value would be silently replaced. A value the
        command line or a YAML gave (not a default) is put back when it is a training or evaluation
        setting (``--model.optimizer.learning_rate``, ``--model.generation.max_new_tokens``, …), and
        refused when it is part of the architecture (``model.config``, ``model.pretrained``,
        ``model.upscale``) and differs from the checkpoint's: the model is the checkpoint's.

        A checkpoint written before keys moved (flat ``learning_rate``, ``memory_lr``, … in its
        hyperparameters) is read with each key at its new place (`midus.moved_keys`).
        """
        import torch

        from midus.checkpoint.kit import TOKENIZER_KEY, read_kit_checkpoint
        from midus.checkpoint.safe_load import TRUST_ENV, CheckpointError, kit_safe_globals, trusted

        subcommand = self.config.get("subcommand")
        config = self.config.get(str(subcommand)) if subcommand else None
        ckpt_path = str(config.get("ckpt_path") or "") if config is not None else ""
        if not ckpt_path:
            return lightning_parses()
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
            return lightning_parses()  # resolved or fetched by the Trainer, which loads it weights-only
        checkpoint = read_kit_checkpoint(ckpt_path, "--ckpt_path", mmap=not trusted())
        # Its step tells TensorBoard what to purge on resume (before_fit).
        self._checkpoint_step = checkpoint.get("global_step")
        # The model to build (instantiate_classes) and where `auto` finds the tokenizer (resolved_tokenizer).
        self._stored_model = StoredModel.read(checkpoint, ckpt_path)
        self._checkpoint_has_tokenizer = TOKENIZER_KEY in checkpoint
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        del checkpoint
        given = self._given_model_values()
        if "_class_path" not in hparams:  # a model given by class path keeps its own keys
            hparams = upgrade_config(hparams, MOVED_KEYS, "model.")
        parse_checkpoint_hparams(self, hparams)
        self._keep_given_model_values(given, ckpt_path)

    def _given_model_values(self) -> dict[str, Any]:
        """The ``model.*`` values the command line and its YAMLs gave, by dotted key (defaults left out)."""
        args = getattr(self, "_args", None)
        if isinstance(args, (dict, Namespace)):
            given = self.parser.parse_object(args, defaults=False)
        else:
            given = self.parser.parse_args(args, defaults=False)
        model = given.get(f"{self.config['subcommand']}.model")
        return dict(model.items()) if isinstance(model, Namespace) else {}

    def _keep_given_model_values(self, given: dict[str, Any], ckpt_path: str) -> None:
        """Put the given training and evaluation settings back over the checkpoint's; refuse a given
        architecture value that differs from the checkpoint's (see `parse_ckpt_path`)."""
        model = self.config[self.config["subcommand"]]["model"]  # (self.subcommand is set after this hook)
        for key, value in given.items():
            stored = model.get(key)
            if stored == value:
                continue
            if key.split(".")[0] in ARCHITECTURE_FIELDS:
                raise ValueError(
                    f"model.{key}={value!r} was given, but --ckpt_path {ckpt_path!r} holds a model made with "
                    f"model.{key}={stored!r}; with --ckpt_path the architecture (model.config, model.pretrained, "
                    "model.upscale) comes from the checkpoint: leave the value out or give the checkpoint's"
                )
            model[key] = value

    def before_fit(self) -> None:
        # Added here rather than as a parser default so that a YAML's callbacks list (which
        # replaces defaults) cannot drop it, and validate/test/predict never see it.
        config = subcommand_config(self)
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

        # Set when parse_ckpt_path read a --ckpt_path file (not for "last", a URL, or no resume).
        step = getattr(self, "_checkpoint_step", None)
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and isinstance(step, int):
                set_purge_step(logger, step)

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


def parse_only(args: list[str]) -> Any:
    """Parse a ``python -m midus`` command line with the kit's parser; returns the subcommand's namespace.

    Nothing is instantiated (no data preparation, no model, no trainer) and no global state changes
    (no seed); errors raise `argparse.ArgumentError` instead of exiting. The ablation runner
    validates every arm with it before any arm runs.
    """
    parsed = _parser().parse_args(args)
    return parsed[parsed.subcommand]


@functools.cache
def _parser() -> LightningArgumentParser:
    # Building the parser (signatures, docstrings) takes seconds, parsing with it a tenth of one.
    strict = {"exit_on_error": False}
    parser_kwargs = {**strict, **{subcommand: strict for subcommand in LightningCLI.subcommands()}}
    return cli_parser(MidusCLI, **cli_kwargs(), parser_kwargs=parser_kwargs)
