"""Every place the kit reaches into Lightning's internals, as one small function (or hook) each.

Lightning's public API offers no way to do these. Each one was read against Lightning
`CHECKED_AGAINST` and says why the kit needs it; the rest of the kit calls these functions and
touches no private Lightning name itself (`tests/test_layering.py` checks the obvious forms). After
a Lightning upgrade, re-read this module against the new sources first: a renamed private method
breaks here, with the kit's reason beside it.

    LightningCLI   `CheckpointHookCLI` (reading ``--ckpt_path``), `parse_checkpoint_hparams`,
                   `subcommand_config`, `cli_parser`
    loggers        `set_purge_step`
    Trainer        `attached_trainer`, `is_fitting`, `logs_this_step`, `validation_follows`,
                   `estimated_stepping_batches`, `put_callback_metrics`
    strategies     `fsdp_checkpoints_activations`
    ModelCheckpoint  `skips_saving`, `save_after_validation`, `save_now`
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

CHECKED_AGAINST = "2.6.6"
"""The Lightning version every reach below was read against."""


# LightningCLI


class CheckpointHookCLI(LightningCLI):
    """LightningCLI whose private step "read ``--ckpt_path``'s hyperparameters" is the public hook
    `parse_ckpt_path`, so the kit's CLI overrides no private method itself."""

    def _parse_ckpt_path(self) -> None:
        # Lightning 2.6.6: LightningCLI.__init__ calls this right after parse_arguments, before the
        # subcommand is set or anything is seeded or built; it torch.loads the checkpoint and parses its
        # hyper_parameters over the whole ``model`` section. No public hook runs between the two, and
        # the kit must check the file before that load and keep the --model.* values it would replace.
        self.parse_ckpt_path(super()._parse_ckpt_path)

    def parse_ckpt_path(self, lightning_parses: Callable[[], None]) -> None:
        """Read ``--ckpt_path`` before anything is built; `lightning_parses` is Lightning's own reading
        (it loads the file and puts its hyperparameters into ``self.config``)."""
        lightning_parses()


def parse_checkpoint_hparams(cli: LightningCLI, hparams: dict[str, Any]) -> None:
    """Parse a checkpoint's hyperparameters over the running subcommand's ``model`` section, as
    Lightning's own ``--ckpt_path`` step does, on hyperparameters the kit has already read (weights-only)
    and upgraded (moved keys), so the file is not loaded a second time.

    Lightning 2.6.6's ``LightningCLI._parse_ckpt_path`` drops ``_instantiator``, wraps a
    ``_class_path`` (a model given by class path) as ``{class_path, dict_kwargs}``, and parses the
    result with ``parser.parse_object`` into ``cli.config``; it writes that line to stderr on failure.
    """
    hparams = dict(hparams)
    hparams.pop("_instantiator", None)
    if not hparams:
        return
    if "_class_path" in hparams:
        hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
    try:
        cli.config = cli.parser.parse_object({cli.config.subcommand: {"model": hparams}}, cli.config)
    except SystemExit:
        sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
        raise


def subcommand_config(cli: LightningCLI) -> Namespace:
    """The running subcommand's section of ``cli.config`` (the whole config when built with ``run=False``).

    Lightning 2.6.6 keeps this lookup in the private ``LightningCLI._get``; the kit reads whole
    sections, and also from `CheckpointHookCLI.parse_ckpt_path`, before ``cli.subcommand`` is set:
    the subcommand is read from the parsed config itself.
    """
    return cli.config.get(str(cli.config.get("subcommand")), cli.config)


class _ParserBuilt(Exception):
    def __init__(self, parser: LightningArgumentParser) -> None:
        super().__init__("parser built")
        self.parser = parser


def cli_parser(cli_class: type[LightningCLI], **kwargs: Any) -> LightningArgumentParser:
    """The parser `cli_class` (with subcommands) parses with, built without parsing, seeding or building anything.

    Lightning 2.6.6 builds the parser in ``LightningCLI.__init__`` and then parses, reads
    ``--ckpt_path``, seeds and instantiates in the same call; there is no public way to get the
    parser alone. The ablation runner parses every arm with it before any arm runs, so this stops
    the constructor at its first step after the parser is built (``parse_arguments``).
    """

    class ParserOnly(cli_class):  # type: ignore[misc, valid-type]
        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            raise _ParserBuilt(parser)

    try:
        ParserOnly(**kwargs, args=[])
    except _ParserBuilt as built:
        return built.parser
    raise AssertionError(f"{cli_class.__name__} never parsed its arguments")  # LightningCLI always does


# Loggers


def set_purge_step(logger: TensorBoardLogger, step: int) -> None:
    """Have the logger's SummaryWriter, not created yet, drop the events logged from `step` on
    (a resumed run logs those steps again), unless the config set ``purge_step`` itself.

    Lightning 2.6.6 keeps the SummaryWriter's keyword arguments in ``TensorBoardLogger._kwargs``
    and creates the writer from them on first use; the logger is built by LightningCLI from the
    YAML, before the checkpoint's step is known to anyone but the kit's CLI.
    """
    if logger._kwargs.get("purge_step") is None:
        logger._kwargs["purge_step"] = step


# Trainer


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The module's Trainer, None when it has none (Lightning 2.6.6's ``module.trainer`` raises then).

    `CausalLM.configure_model` also runs for a module built outside a fit (tests, analyses), where
    ``LightningModule._trainer`` is None.
    """
    return module._trainer


def is_fitting(trainer: pl.Trainer | None) -> bool:
    """Whether `trainer` runs ``fit`` (not validate, test or predict).

    ``TrainerFn`` lives in ``lightning.pytorch.trainer.states`` (Lightning 2.6.6), not re-exported at
    a public path; model setup refuses some settings only for a fit.
    """
    return trainer is not None and trainer.state.fn == TrainerFn.FITTING


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the logger writes this step's values (every ``trainer.log_every_n_steps``).

    Lightning 2.6.6 decides it in ``trainer._logger_connector.should_update_logs`` (its own
    LearningRateMonitor asks the same); `CausalLM` logs values only the logger reads on those steps
    alone, since each ``self.log`` costs time (experiments/README.md).
    """
    return bool(trainer._logger_connector.should_update_logs)


def validation_follows(trainer: pl.Trainer) -> bool:
    """Whether a validation runs after the training batch that just ended.

    Lightning 2.6.6 decides it in ``fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher)``;
    `PeriodicCheckpoint` saves such a step after its validation, as Lightning resumes it.
    """
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


def estimated_stepping_batches(trainer: pl.Trainer) -> int:
    """``trainer.estimated_stepping_batches``, without costing a resumed run its place in the data.

    With ``max_epochs`` bounding the run, Lightning 2.6.6 builds the train loader to count its batches
    (``fit_loop.setup_data``). Asked from ``configure_optimizers``, that happens before the checkpoint
    is restored, and the fit loop then keeps this loader without loading the checkpoint's loader state
    (``fit_loop._load_combined_loader_states`` runs only inside ``setup_data``'s building; Lightning
    issue #20550): a run resumed mid-epoch would restart that epoch's batch order from its start.
    Dropping the counted loader makes the fit loop build it again after the restore, as it does for a
    run bounded by ``max_steps``. The loader only counted: its batches were never iterated.
    """
    loop = trainer.fit_loop
    built_before = loop._combined_loader is not None
    steps = trainer.estimated_stepping_batches
    if not built_before and loop._combined_loader is not None:
        if loop._data_fetcher is not None:
            loop._data_fetcher.teardown()
        loop._combined_loader, loop._data_fetcher = None, None
    return int(steps)


def put_callback_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Put a validation's `metrics` into ``trainer.callback_metrics`` for the callbacks that read them.

    Two validations Lightning 2.6.6 does not leave there: the sanity pass's (``_run_sanity_check``
    resets the logger connector), which is all a fit of 0 steps (an ablation's un-continued base)
    has to summarise; and the last validation of a run resumed from its final checkpoint, which
    trains no step and so validates nothing (``callback_metrics`` is not checkpointed). It returns
    the connector's own dict, so updating it sticks.
    """
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})


# Strategies


def fsdp_checkpoints_activations(strategy: FSDPStrategy) -> bool:
    """Whether the FSDP strategy checkpoints activations itself (``activation_checkpointing_policy`` set).

    Lightning 2.6.6 keeps what it made of that argument in ``FSDPStrategy._activation_checkpointing_kwargs``
    (empty without one); the kit then leaves its own block checkpointing off and counts the saving
    in the memory estimate.
    """
    return bool(strategy._activation_checkpointing_kwargs)


# ModelCheckpoint (for `midus.training.checkpoints.PeriodicCheckpoint`, which saves on its own schedule)


def skips_saving(checkpoint: ModelCheckpoint, trainer: pl.Trainer) -> bool:
    """Whether ModelCheckpoint would save nothing now (fast_dev_run, sanity check, a step saved already).

    Lightning 2.6.6: ``ModelCheckpoint._should_skip_saving_checkpoint``.
    """
    return bool(checkpoint._should_skip_saving_checkpoint(trainer))


def save_after_validation(checkpoint: ModelCheckpoint) -> None:
    """Have `checkpoint` save at the end of the validation that follows, with what it updated.

    Lightning 2.6.6: ``ModelCheckpoint._defer_save_until_validation``, which its ``on_validation_end`` honours.
    """
    checkpoint._defer_save_until_validation = True


def save_now(checkpoint: ModelCheckpoint, trainer: pl.Trainer) -> None:
    """Save `checkpoint`'s top-k and last files now, as its own step trigger does.

    Lightning 2.6.6: ``_monitor_candidates``, ``_save_topk_checkpoint`` and ``_save_last_checkpoint``
    of ModelCheckpoint (its public hooks decide when; the kit decides that itself).
    """
    candidates = checkpoint._monitor_candidates(trainer)
    checkpoint._save_topk_checkpoint(trainer, candidates)
    checkpoint._save_last_checkpoint(trainer, candidates)
