"""An interrupted fit resumed from a checkpoint continues exactly as if it had never stopped."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from midus.checkpoint.safe_load import kit_safe_globals
from midus.data.datamodule import EmbeddedCorpusConfig, LanguageModelingData
from midus.model import ModelConfig
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.training.checkpoints import PeriodicCheckpoint
from midus.training.config import OptimizerConfig, ScheduleConfig
from midus.training.run_summary import RunSummary
from midus.upscale import UpscaleConfig


class Preempted(RuntimeError):
    """What the test's stand-in for a preemption raises."""


class StepRecorder(pl.Callback):
    """Record each step's training loss and learning rates; raise `Preempted` before step `stop_before`."""

    def __init__(self, stop_before: int | None = None) -> None:
        self.stop_before = stop_before
        self.losses: dict[int, float] = {}
        self.micro_batch_losses: list[float] = []  # every batch, also those inside an accumulation
        self.rates: dict[int, list[float]] = {}
        self.validated_at: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validated_at.append(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.stop_before:
            raise Preempted(f"preempted before step {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step just taken
        self.losses[step] = outputs["loss"].item()
        self.micro_batch_losses.append(outputs["loss"].item())
        self.rates[step] = [group["lr"] for group in trainer.optimizers[0].param_groups]


@pytest.fixture(scope="module")
def data(tiny_cache: Path) -> LanguageModelingData:
    torch.manual_seed(7)  # the shuffle seed is the global seed at construction
    # 3 people x 4 documents: 43 blocks of 32, 5 batches of 8 per epoch.
    return LanguageModelingData(
        embedded=EmbeddedCorpusConfig(seed=0, num_people=3, docs_per_person=4),
        bpe_vocab_size=300, block_size=32, batch_size=8, cache_dir=str(tiny_cache),
    )


def _module(data: LanguageModelingData, upscale: UpscaleConfig | None) -> CausalLM:
    config = ModelConfig(vocab_size=data.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    return CausalLM(config, upscale=upscale or UpscaleConfig(), probes=ProbeConfig(recall_questions=0),
                    optimizer=OptimizerConfig(learning_rate=1e-2), schedule=ScheduleConfig(warmup_steps=3))


def _fit(data, root: Path, max_steps: int, upscale=None, stop_before=None, ckpt_path=None, **trainer_options):
    pl.seed_everything(0)
    recorder = StepRecorder(stop_before)
    summary = RunSummary(latency_prompt_tokens=4, latency_new_tokens=2)
    periodic = PeriodicCheckpoint(every_n_train_steps=1, keep=-1, dirpath=str(root / "checkpoints"))
    best = ModelCheckpoint(dirpath=root / "checkpoints", filename="best-{step}", monitor="val/loss")
    trainer = pl.Trainer(
        max_steps=max_steps, val_check_interval=4, check_val_every_n_epoch=None, accelerator="cpu",
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=root, callbacks=[recorder, summary, periodic, best], **trainer_options,
    )
    module = _module(data, upscale)
    try:
        # A plain Trainer's checkpoint holds the kit's config dataclasses (the CLI allows them itself).
        with torch.serialization.safe_globals(kit_safe_globals()):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Preempted:
        pass
    return recorder, summary, best, trainer


def _interrupted_and_resumed(data, tmp_path: Path, max_steps: int, stop_before: int, upscale=None, **options):
    whole, whole_summary, whole_best, whole_trainer = _fit(data, tmp_path / "whole", max_steps, upscale, **options)
    first, _, _, _ = _fit(data, tmp_path / "resumed", max_steps, upscale, stop_before=stop_before, **options)
    if "accumulate_grad_batches" not in options:
        assert sorted(first.losses) == list(range(stop_before))
    checkpoint = tmp_path / "resumed" / "checkpoints" / f"step-{stop_before}.ckpt"
    second, summary, best, trainer = _fit(
        data, tmp_path / "resumed", max_steps, upscale, ckpt_path=checkpoint, **options
    )
    return whole, whole_summary, whole_best, first, second, summary, best, trainer, whole_trainer


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_before", [3, 4, 5, 8], ids=["mid-epoch", "validation-step", "epoch-boundary", "second-epoch-validation-step"]
)
def test_resumed_from_scratch_run_has_the_uninterrupted_loss_at_every_step(data, tmp_path, stop_before) -> None:
    whole, whole_summary, whole_best, first, second, summary, best, trainer, whole_trainer = _interrupted_and_resumed(
        data, tmp_path, 11, stop_before
    )
    losses = {**first.losses, **second.losses}
    assert sorted(second.losses) == list(range(stop_before, 11))  # nothing retrained, nothing skipped
    assert losses == whole.losses  # bit for bit: the same batches in the same order on the same weights
    assert {step: second.rates[step] for step in second.rates} == {step: whole.rates[step] for step in second.rates}
    # The summary counts the whole run, not the process that finished it.
    counts, whole_counts = (
        {key: record["train"][key] for key in ("batches", "tokens")}
        for record in (summary.summary(trainer, trainer.lightning_module),
                       whole_summary.summary(whole_trainer, whole_trainer.lightning_module))
    )
    assert counts == whole_counts == {"batches": 11, "tokens": 11 * 8 * 32}
    # Validation of a step that is also a checkpoint step ran before the save, so exactly once.
    assert first.validated_at + second.validated_at == whole.validated_at
    assert summary._best_val_loss == whole_summary._best_val_loss
    assert Path(best.best_model_path).name == Path(whole_best.best_model_path).name
    assert trainer.global_step == 11


@pytest.mark.slow
def test_resumed_upscaled_run_has_the_uninterrupted_loss_at_every_step(data, tmp_path) -> None:
    base_run, _, _, _ = _fit(data, tmp_path / "base", 4)
    base = tmp_path / "base" / "checkpoints" / "step-4.ckpt"
    upscale = UpscaleConfig(base_checkpoint=str(base), method="midus", every=1, branch="hml")
    # An epoch cut short by limit_train_batches, resumed at its end and mid-way through the next.
    for stop_before in (3, 5):
        whole, _, _, first, second, _, _, _, _ = _interrupted_and_resumed(
            data, tmp_path / str(stop_before), 7, stop_before, upscale, limit_train_batches=3
        )
        assert sorted(second.losses) == list(range(stop_before, 7))
        assert {**first.losses, **second.losses} == whole.losses


@pytest.mark.slow
def test_resumed_run_with_gradient_accumulation_has_the_uninterrupted_losses(data, tmp_path) -> None:
    # 2 batches per optimizer step, and Lightning steps on an epoch's odd last batch: 3 steps per
    # 5-batch epoch; the checkpoint after step 2 is 4 batches into the first.
    whole, _, _, first, second, summary, _, trainer, _ = _interrupted_and_resumed(
        data, tmp_path, 6, 2, accumulate_grad_batches=2
    )
    assert len(whole.micro_batch_losses) == 10
    assert first.micro_batch_losses + second.micro_batch_losses == whole.micro_batch_losses
    assert summary.summary(trainer, trainer.lightning_module)["train"]["batches"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("stop_before", [3, 7], ids=["first-epoch", "second-epoch"])
def test_a_run_bounded_by_epochs_resumes_mid_epoch_to_the_uninterrupted_losses(data, tmp_path, stop_before) -> None:
    # max_epochs without max_steps: the schedule's length comes from Lightning's estimated_stepping_batches,
    # which builds the train loader before the checkpoint is restored (Lightning issue #20550). Before the
    # kit worked around it, the resumed run restarted the interrupted epoch's batch order from its start.
    whole, _, _, first, second, _, _, trainer, _ = _interrupted_and_resumed(
        data, tmp_path, -1, stop_before, max_epochs=3
    )
    assert sorted(second.losses) == list(range(stop_before, 15))  # 3 epochs of 5 batches
    assert {**first.losses, **second.losses} == whole.losses
    assert trainer.current_epoch == 3
