"""The knobs of `midus.training.CausalLM`, grouped: ``model.optimizer``, ``model.schedule``,
``model.memory_optimizer``, ``model.compute`` and ``model.generation`` (``model.probes`` is
`midus.probes.ProbeConfig`).

Each group checks its own values when it is built (``__post_init__``), so a bad value fails
before the model or the data is built, with an error naming the field's full config path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class OptimizerConfig:
    """``model.optimizer``: AdamW over the parameter groups (`midus.training.optim.parameter_groups`)."""

    learning_rate: float = 3e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay of weight matrices (never norms, biases, embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    fused: bool = False
    """Take AdamW's fused kernel (one kernel for all parameters) where it supports every parameter
    (`midus.training.optim.fused_adamw_supported`); on CPU the default loops over the tensors in
    Python. Off by default because it rounds differently: the same seed then gives a slightly
    different curve (its cost and effect: experiments/README.md)."""

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"model.optimizer.learning_rate must be positive, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"model.optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"model.optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class ScheduleConfig:
    """``model.schedule``: the learning rate of every group per step (`midus.training.optim.warmup_cosine`)."""

    warmup_steps: int = 50
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (1.0: constant after the warmup)."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"model.schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"model.schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class MemoryOptimizerConfig:
    """``model.memory_optimizer``: the AdamW group of memory values (HIVE banks, value tables), which
    trains without weight decay at a rate of its own."""

    learning_rate: float = 0.03
    """Peak learning rate of the memory group; 0 means ``model.optimizer.learning_rate``. The default
    0.03 (10–30× the base rates of the kit's experiments) and `subkeys` come from the memory_health
    study: at the base rate the memories were not used."""
    subkeys: bool = True
    """Put the product-key sub-keys in the memory group too."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """The memory group's schedule after the shared warmup: ``cosine`` (decays with every other
    group, to ``model.schedule.min_lr_ratio``) or ``constant`` (stays at its peak rate)."""

    def __post_init__(self) -> None:
        if not self.learning_rate >= 0:
            raise ValueError(
                f"model.memory_optimizer.learning_rate must be 0 (= model.optimizer.learning_rate) or positive, "
                f"got {self.learning_rate}"
            )
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"model.memory_optimizer.schedule={self.schedule!r}; expected cosine or constant")


@dataclass
class ComputeConfig:
    """``model.compute``: how the training step is computed; the same loss and gradients either way
    (up to summation order), at another speed and memory."""

    compile: bool = False
    """Compile the model with `torch.compile` before training. ``python -m midus`` then sets
    ``trainer.deterministic: warn`` unless the config sets it: compiled kernels otherwise accumulate
    the embedding gradient with atomic adds, and the same seed gives a different curve in every run;
    in that mode inductor takes the deterministic eager kernels for those ops. What a compiled step
    saves, and what compiling costs: experiments/README.md (benchmarks/small_model_speed.py)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward instead of keeping its activations (about one more forward
    of compute); the same loss and gradients, training forwards only. Under FSDP the strategy's
    ``activation_checkpointing_policy`` does it instead (`midus.training.model_setup`). ``fit`` logs
    its memory estimate first (`midus.training.memory_estimate`)."""
    loss_chunk_tokens: int = 0
    """Compute the loss in chunks of this many tokens without full-vocabulary logits
    (`midus.model.chunked_loss`: the same loss and gradients up to summation order); 0 (the default)
    builds the full logits. For large vocabularies: about d_model tokens."""

    def __post_init__(self) -> None:
        if self.loss_chunk_tokens < 0:
            raise ValueError(
                "model.compute.loss_chunk_tokens must be 0 (full logits) or a positive number of tokens, "
                f"got {self.loss_chunk_tokens}"
            )


@dataclass
class GenerationConfig:
    """``model.generation``: how ``predict`` continues each prompt."""

    max_new_tokens: int = 32
    """Tokens generated per prompt."""
    temperature: float = 0.0
    """Sampling temperature (0 = greedy)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"model.generation.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"model.generation.temperature must be >= 0 (0: greedy), got {self.temperature}")


@dataclass
class SparseMemoryConfig:
    """``model.sparse_memory``: sparse memory finetuning (Lin et al. 2025, arXiv 2510.15103): of each memory's
    value table only the rows that the new text reads much more often than the background text train
    (`midus.training.sparse_memory`; docs/memory.md, "Sparse memory finetuning")."""

    trainable_slots: int = 0
    """Value rows that train per memory block (t; a HIVE bank row is one slot, read by every head);
    0 (the default) is off: the value tables train whole, as without this section."""
    ranking: Literal["tfidf", "frequency"] = "tfidf"
    """How the rows are ranked before a fit trains: ``tfidf`` (the paper's: share of the new text's reads
    times log((B + 1) / (background batches reading the row + 1))) or ``frequency`` (reads of the new text)."""
    count_batches: int = 16
    """Batches (of `count_batch_size` blocks) of new text, and as many of background text, whose reads are
    counted once before training. The new text is the training population's own documents, the
    background the replay population's (``data.embedded.replay_seed``: the base's own documents)."""
    count_batch_size: int = 0
    """Sequences (blocks) per counted batch, 0: ``data.batch_size``. A background batch is TF-IDF's
    "document": where one batch reads nearly every slot (a small memory, many tokens), every row gets
    the same IDF and the ranking falls back to row order; smaller batches keep the rows apart."""
    freeze_rest: bool = True
    """Freeze every other parameter too, as the paper does; false: the rest trains as it would without
    this section (e.g. the inserted blocks under ``model.upscale.trainable: new``)."""

    def __post_init__(self) -> None:
        if self.trainable_slots < 0:
            raise ValueError(
                f"model.sparse_memory.trainable_slots must be 0 (off) or a number of rows, got {self.trainable_slots}"
            )
        if self.ranking not in ("tfidf", "frequency"):
            raise ValueError(f"model.sparse_memory.ranking={self.ranking!r}; expected tfidf or frequency")
        if self.count_batches < 1:
            raise ValueError(f"model.sparse_memory.count_batches must be >= 1, got {self.count_batches}")
        if self.count_batch_size < 0:
            raise ValueError(
                "model.sparse_memory.count_batch_size must be 0 (= data.batch_size) or >= 1, "
                f"got {self.count_batch_size}"
            )

    @property
    def enabled(self) -> bool:
        """Whether only chosen rows of the value tables train."""
        return self.trainable_slots > 0


GROUPS: dict[str, type] = {
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "memory_optimizer": MemoryOptimizerConfig,
    "compute": ComputeConfig,
    "generation": GenerationConfig,
    "sparse_memory": SparseMemoryConfig,
}
"""``model.<name>`` -> its class: what the ablation runner builds to check an arm before it runs."""
