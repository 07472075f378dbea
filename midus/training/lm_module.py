"""The LightningModule for causal language-model training of a kit model.

The model itself is plain PyTorch (`midus.model.MidusLM`); this class owns the training step and
its loss, the optimizer groups and schedule, and logging. What a validation measures besides
``val/loss`` (recall, knowledge bits, memory zeroed, slot usage) is `midus.probes.ValidationProbes`,
called from the validation hooks here.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from midus.checkpoint import checkpoint_tokenizer, kit_entries
from midus.checkpoint.kit import PROGRESS_KEY, SPARSE_MEMORY_KEY, frozen_parameter_names
from midus.data.text_data import TextData
from midus.data.tokenizers import same_vocabulary
from midus.model import ModelConfig
from midus.model.transformer import next_token_loss
from midus.probes import ProbeConfig, Processes, ValidationProbes
from midus.training.config import (
    ComputeConfig,
    GenerationConfig,
    MemoryOptimizerConfig,
    OptimizerConfig,
    ScheduleConfig,
    SparseMemoryConfig,
)
from midus.training.divergence import check_finite_loss
from midus.training.lightning_internals import attached_trainer, estimated_stepping_batches, is_fitting, logs_this_step
from midus.training.memory_estimate import MemoryReport
from midus.training.model_setup import setup_model
from midus.training.model_source import build_model
from midus.training.optim import fused_adamw_supported, parameter_groups, warmup_cosine
from midus.training.progress import TrainingProgress
from midus.training.sparse_memory import choose_rows, make_sparse, saved_frozen_parameter_names, sparse_rows
from midus.upscale import UpscaleConfig


class CausalLM(pl.LightningModule):
    """Next-token training of a `MidusLM`, from scratch or from a local Hugging Face checkpoint.

    Args:
        config: the model architecture, layer by layer (`vocab_size` is linked from the data).
        pretrained: a local Hugging Face Llama-family checkpoint directory to start from; its
            own architecture replaces `config` (use ``data.tokenizer: hf`` with the same directory).
        upscale: make a trained base deeper (DUS copies or MIDUS memory blocks) and train
            that; its architecture replaces `config` (see `midus.upscale.UpscaleConfig`).
        optimizer: AdamW's learning rate, weight decay, betas and kernel (`OptimizerConfig`).
        schedule: the warmup and the cosine decay of every group (`ScheduleConfig`).
        memory_optimizer: the memory values' own AdamW group: its rate, whether the product-key
            sub-keys join it, and its schedule (`MemoryOptimizerConfig`).
        probes: what each full validation measures besides ``val/loss``: the recall probe,
            knowledge bits, the memory-zeroed loss and recall, slot usage (`midus.probes.ProbeConfig`).
        compute: compilation, activation checkpointing and the chunked loss (`ComputeConfig`).
        generation: tokens and temperature of ``predict`` (`GenerationConfig`).
        sparse_memory: train only the value rows the new text reads more than the background, a fixed
            number per memory block (Lin et al. 2025; `SparseMemoryConfig`, off by default).
        allocation_data: the data, linked by the CLI (not a setting): ``model.upscale.memory_allocation:
            head_importance`` scores the base on its first training batches.

    Under the CLI the saved hyperparameters are the parsed config, plain data (a checkpoint's
    ``hyper_parameters`` rebuild the same module); this class reads its settings from the groups
    it was given (``optimizer_config``, ...), never from ``hparams``, which may hold either form.
    """

    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        pretrained: str = "",
        upscale: UpscaleConfig = UpscaleConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        schedule: ScheduleConfig = ScheduleConfig(),
        memory_optimizer: MemoryOptimizerConfig = MemoryOptimizerConfig(),
        probes: ProbeConfig = ProbeConfig(),
        compute: ComputeConfig = ComputeConfig(),
        generation: GenerationConfig = GenerationConfig(),
        sparse_memory: SparseMemoryConfig = SparseMemoryConfig(),
        allocation_data: TextData | None = None,
    ) -> None:
        super().__init__()
        # The config object carries the linked vocab size, so saved hparams rebuild the same model.
        # allocation_data is the prepared data itself, not a setting: never a hyperparameter.
        self.save_hyperparameters(ignore=["allocation_data"])
        # Each group checked its own values when it was built (`midus.training.config`).
        self.optimizer_config = optimizer
        self.schedule_config = schedule
        self.memory_optimizer_config = memory_optimizer
        self.compute_config = compute
        self.generation_config = generation
        self.sparse_memory_config = sparse_memory
        source = build_model(config, pretrained, upscale, allocation_data)
        self.model = source.model
        self.model.activation_checkpointing = compute.activation_checkpointing  # training forwards only (MidusLM)
        self.base_parameters = source.base_parameters
        self.eval_loss = MeanMetric()  # validation and test never run at once
        self.probes = ValidationProbes(probes)
        self.progress = TrainingProgress()
        self.step0_metrics: dict[str, float] = {}  # a full sanity pass's: a run of 0 steps reports them

    @property
    def tokens_seen(self) -> int:
        """Tokens trained on by this process since step 0 (checkpointed: resumes continue it)."""
        return self.progress.tokens

    @property
    def batches_seen(self) -> int:
        """Training batches of this process since step 0, several per step under accumulation."""
        return self.progress.batches

    @property
    def added_parameters(self) -> int:
        """Parameters the up-scaling added to its base (0 without up-scaling)."""
        return self.model.num_parameters() - self.base_parameters if self.base_parameters else 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The resolved architecture, what the base build gave it (frozen parameters, the base's size:
        # validate/test/predict/resume rebuild the model without its base) and the tokenizer
        # (evaluation needs only the file), as plain data: `midus.checkpoint.kit`.
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        sparse = self.sparse_memory_config.enabled  # (a plain fit never reads the sparse-memory code)
        frozen = saved_frozen_parameter_names(self.model) if sparse else frozen_parameter_names(self.model)
        checkpoint.update(kit_entries(self.model.config, tokenizer, frozen, self.base_parameters))
        rows = sparse_rows(self.model) if sparse else {}
        if rows:
            checkpoint[SPARSE_MEMORY_KEY] = rows
        # Training progress counted since step 0, so a resumed run's train/tokens continue (and
        # Lightning's Throughput, which needs samples >= the restored global step, accepts them).
        checkpoint[PROGRESS_KEY] = self.progress.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.progress.load_state_dict(checkpoint.get(PROGRESS_KEY) or {}, checkpoint.get("global_step", 0))
        # validate/test --ckpt_path with other data: a retrained tokenizer would score garbage.
        stored = checkpoint_tokenizer(checkpoint)
        tokenizer = getattr(getattr(attached_trainer(self), "datamodule", None), "tokenizer", None)
        if stored is not None and tokenizer is not None and not same_vocabulary(stored, tokenizer):
            raise ValueError(
                "data: the data's tokenizer is not the one this checkpoint was trained with; evaluate other "
                "text with the checkpoint's own tokenizer: data.tokenizer=hf and data.tokenizer_path=<the .ckpt>"
            )
        if is_fitting(attached_trainer(self)):
            self._resume_sparse_memory(checkpoint.get(SPARSE_MEMORY_KEY))

    def setup(self, stage: str) -> None:
        # Sparse memory finetuning chooses its rows before the optimizer is built (and before a resumed
        # fit's weights are loaded; `on_load_checkpoint` then puts the checkpoint's own rows in place).
        settings = self.sparse_memory_config
        if stage != "fit" or not settings.enabled:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                "model.sparse_memory.trainable_slots under FSDPStrategy: FSDP shards the model before a resumed "
                "fit's weights are loaded, so the sparse tables could not be restored; train on one device or DDP"
            )
        self.model.to(self.trainer.strategy.root_device)  # the strategy moves it there anyway; count there
        rows = choose_rows(self.model, settings, self.trainer.datamodule, self.trainer.strategy.root_device)
        make_sparse(self.model, settings, rows)

    def _resume_sparse_memory(self, stored: dict | None) -> None:
        """A fit resumed from a checkpoint trains the rows that checkpoint's fit trained."""
        settings = self.sparse_memory_config
        if settings.enabled and stored is None:
            raise ValueError(
                f"model.sparse_memory.trainable_slots={settings.trainable_slots}: --ckpt_path was not trained with "
                "sparse memory finetuning, so its optimizer state is the full tables'; start sparse finetuning from "
                "it as a base (model.upscale.base_checkpoint) or resume with trainable_slots: 0"
            )
        if stored is not None and not settings.enabled:
            raise ValueError(
                "model.sparse_memory.trainable_slots=0: --ckpt_path was trained with sparse memory finetuning ("
                f"{len(next(iter(stored.values())))} rows per memory block); resume it with that model.sparse_memory"
            )
        if stored is not None:
            make_sparse(self.model, settings, stored)

    def next_token_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean next-token loss, inputs, targets) of a batch of packed rows (``input_ids``: B x (T + 1))."""
        ids = batch["input_ids"]
        inputs, targets = ids[:, :-1], ids[:, 1:]
        chunk = self.compute_config.loss_chunk_tokens
        if chunk:
            # Through the model's forward (so a compiled model compiles the chunked loss too).
            loss = self.model(inputs, targets=targets, loss_chunk_tokens=chunk)
            return loss, inputs, targets
        return next_token_loss(self.model(inputs), targets), inputs, targets

    def configure_model(self) -> None:
        # Compilation and activation checkpointing as the strategy needs them (`midus.training.model_setup`).
        trainer = attached_trainer(self)
        strategy = getattr(trainer, "strategy", None)
        fitting = is_fitting(trainer)
        compute = self.compute_config
        setup_model(self.model, strategy, compute.compile, compute.activation_checkpointing, fitting)

    def configure_callbacks(self) -> list[pl.Callback]:
        # fit logs its memory estimate first (and on CUDA the measured peak after a few steps).
        return [MemoryReport()]

    def on_fit_start(self) -> None:
        self.progress.start(self.trainer.world_size)
        self.step0_metrics = {}  # this fit's own sanity pass, not an earlier fit's
        counts = {
            "params/total": self.model.num_parameters(),
            "params/trainable": self.model.num_parameters(trainable_only=True),
            "params/embedding": self.model.embed.weight.numel(),
            "params/memory": self.model.num_memory_parameters(),
            "params/added": self.added_parameters,
        }
        for logger in self.loggers:
            logger.log_hyperparams(counts)

    def training_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> dict[str, torch.Tensor | int]:
        loss, _, targets = self.next_token_loss(batch)
        tokens = targets.numel()
        check_finite_loss(loss, self.trainer)  # before backward: a NaN step must not update anything
        self.log("train/loss", loss, prog_bar=True)
        if self._logging_step():
            names = (group["name"] for group in self.optimizers().param_groups)
            rates = dict(zip(names, self.lr_schedulers().get_last_lr()))
            self.log("train/lr", rates.get("decay", next(iter(rates.values()))))
            if "memory" in rates:
                self.log("train/lr_memory", rates["memory"])
        self.progress.add_batch(tokens, batch["input_ids"].shape[0])
        # Lightning divides "loss" by accumulate_grad_batches before callbacks see it; the undivided
        # token-weighted sum goes beside it, for the run summary's mean training loss.
        return {"loss": loss, "loss_sum": loss.detach() * tokens, "tokens": tokens}

    def on_train_batch_end(self, outputs, batch, batch_index: int) -> None:
        self.progress.update_rate()
        if not self._logging_step():
            return
        rate = self.progress.tokens_per_sec()
        if rate is not None:
            self.log("train/tokens_per_sec", rate, prog_bar=True)
        # Every process trains on a batch of the same size: the run's counts are world_size times this one's.
        self.log("train/tokens", float(self.progress.tokens * self.trainer.world_size))

    def _logging_step(self) -> bool:
        """Whether the logger writes this step's values (every ``trainer.log_every_n_steps``): values only
        the logger reads are logged on those steps, as Lightning's LearningRateMonitor decides, since each
        ``self.log`` has a cost (experiments/README.md); ``train/loss`` is logged every step."""
        return bool(logs_this_step(self.trainer) or self.trainer.fast_dev_run)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> None:
        loss, inputs, targets = self.next_token_loss(batch)
        # Weighted by tokens: a short final batch counts for what it holds.
        self.eval_loss.update(loss, weight=targets.numel())
        self.probes.observe(self.model, inputs, targets, loss, targets.numel())

    def test_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> None:
        self.validation_step(batch, batch_index)

    def _eval_loss_metrics(self, prefix: str) -> dict[str, torch.Tensor]:
        loss = self.eval_loss.compute()
        self.eval_loss.reset()
        return {f"{prefix}/loss": loss, f"{prefix}/ppl": torch.exp(loss)}

    def on_test_epoch_end(self) -> None:
        for name, value in self._eval_loss_metrics("test").items():
            self.log(name, value, prog_bar=name.endswith("loss"), sync_dist=True)

    def _full_validation(self) -> bool:
        # A partial sanity check (a couple of batches) is not worth diagnostics or the probe.
        return not self.trainer.sanity_checking or math.isinf(self.trainer.num_sanity_val_steps)

    def processes(self) -> Processes:
        """This run's processes as the probes see them, with the strategy's sum over them."""
        return Processes(
            rank=self.trainer.global_rank, world_size=self.trainer.world_size,
            sum=lambda tensor: self.trainer.strategy.reduce(tensor, reduce_op="sum"), device=self.device,
            collective_forwards=isinstance(self.trainer.strategy, FSDPStrategy),
        )

    def on_validation_epoch_start(self) -> None:
        # (Under FSDP the weights outside a forward are shards: no zeroed passes.)
        self.probes.start(
            self.model, full=self._full_validation(), memory_zeroed=not isinstance(self.trainer.strategy, FSDPStrategy)
        )

    def on_validation_epoch_end(self) -> None:
        metrics = self._eval_loss_metrics("val")
        data = self.trainer.datamodule
        metrics.update(self.probes.finish(
            self.model, getattr(data, "recall_questions", {}), getattr(data, "tokenizer", None), self.processes()
        ))
        if self.trainer.sanity_checking:
            # A full sanity pass (num_sanity_val_steps: -1) measures the untrained model: keep it
            # as the step-0 point of every curve. Lightning discards sanity-check logs otherwise.
            if self._full_validation() and self.global_step == 0:
                self.step0_metrics = {name: float(value) for name, value in metrics.items()}
                for logger in self.loggers:
                    logger.log_metrics(self.step0_metrics, step=0)
            return
        # Every value is already reduced over processes (torchmetrics, the probes' sums), so the same
        # on each; sync_dist only states that (and keeps Lightning from warning it is per process).
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("val/loss", "val/recall_acc"), sync_dist=True)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_index: int) -> list[list[int]]:
        """Continue each prompt; returns the new token ids (decode with the data tokenizer)."""
        prompt = batch["input_ids"]
        settings = self.generation_config
        generated = self.model.generate(prompt, settings.max_new_tokens, temperature=settings.temperature)
        return generated[:, prompt.shape[1] :].tolist()

    def configure_optimizers(self):
        return self.optimizer_and_schedule(estimated_stepping_batches(self.trainer))

    def optimizer_and_schedule(self, total_steps: int) -> dict:
        """AdamW over the parameter groups and the per-step warmup-cosine schedule over `total_steps`,
        as `configure_optimizers` returns them (benchmarks build the same optimizer outside a Trainer)."""
        adamw, schedule, memory = self.optimizer_config, self.schedule_config, self.memory_optimizer_config
        groups = parameter_groups(self.model, adamw.weight_decay, memory.learning_rate or None, memory.subkeys)
        fused = None  # PyTorch's default implementation
        if adamw.fused:
            if fused_adamw_supported(groups):
                fused = True
            else:
                rank_zero_warn("model.optimizer.fused: the fused AdamW does not take these parameters (a tensor "
                               "subclass, or a device other than CPU and CUDA); training with the default AdamW")
        optimizer = torch.optim.AdamW(groups, lr=adamw.learning_rate, betas=tuple(adamw.betas), fused=fused)
        scheduler = warmup_cosine(
            optimizer,
            schedule.warmup_steps,
            total_steps,
            schedule.min_lr_ratio,
            memory_constant=memory.schedule == "constant",
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
