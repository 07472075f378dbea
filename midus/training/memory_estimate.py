"""How much device memory a training step of a kit model needs: an estimate before ``fit`` starts.

`estimate_training_memory` is a pure function of the model config, its parameter counts, the
micro-batch (batch × block size), ``trainer.precision``, activation checkpointing and the loss
chunk. `MemoryReport` (a callback `midus.training.CausalLM` adds to every ``fit``) logs it as one
INFO line of the ``midus`` logger and as ``memory_estimate_gib/*`` hyperparameters and, on CUDA,
the measured peak (``torch.cuda.max_memory_allocated``) after the first few training batches.

The terms, in bytes. r: bytes of a parameter and of the residual stream (4 under ``32-true`` and
the ``*-mixed`` precisions, 2 under ``*-true`` half precisions); c: bytes of a matmul's inputs and
outputs (2 under ``*-mixed``, else r). P: parameters, P_t: trainable ones.

* weights = r · P; gradients = r · P_t; optimizer = 2 · r · P_t (AdamW's two moments). The
  optimizer step adds one more r · P_t of temporaries (the multi-tensor AdamW's √v), after the
  backward has freed the activations: the total takes the larger of the two.
* activations of one micro-batch of N = batch · block tokens (below). Under ``*-mixed`` autocast
  also keeps a c-byte copy of every matmul weight from its forward use to its backward.

Saved for the backward per token (d model width, a attention width n_heads · head_dim, g key/value
width, f FFN width, H heads; m = 1 under mixed precision, where each linear layer casts its input
anew; 4-byte log-sum-exp and norm statistics):

    Transformer block  4r·d + (m ? (3 + L_b)·c : 2c)·d + 2c·(a + g) + 4H + 8 + branch
    memory block       2r·d + (m ? 3c : c)·d + 2c·(a + g) + 4H + 4 + branch
    branch ffn         4c·f                                   (L_b = 2 linear layers read the norm)
    branch hml         2r·a + m·c·a + 8H  (query norm, if any)  + 36·H·k  + c·H·d_l (hive values)
    branch pkm         c·Pq + 2r·Pq + 8P  (query norm, if any)  + 36·P·k   (P query heads of width q, L_b = 1)
    final norm         (2r + c)·d
    rotary tables      2·T·d_h·r, once per micro-batch

A memory block's ``memory.internal_residual`` adds r·d and ``memory.output_gate`` c·d.
(36·H·k: the kept sub-key indices, the chosen pair, the slots and the float32 retrieval weights;
with p sub-spaces, ``memory.n_subspaces``, the p shortlists' indices make it (8p + 20)·H·k.)
These are the tensors autograd keeps, counted on this kit's code with PyTorch 2.13 on CPU (the
tests compare the estimate with PyTorch's own memory tracker); attention is a fused kernel
(flash attention: O(T) memory). Under float32 with grouped-query attention (n_kv_heads <
n_heads) CUDA has no fused kernel for `scaled_dot_product_attention` and falls back to the math
kernel, which also keeps the (batch, heads, T, T) attention probabilities: add c·H·T per token and
block (`math_attention`).

The loss: full-vocabulary logits (V) keep a float32 log-softmax (4V per token) and in their
backward two more float32 (tokens, V) tensors: 12·V·N at the start of the backward (the forward
holds (8 + m·c)·V·N for a moment: the logits, their float32 copy, the log-softmax). Chunked
(``model.compute.loss_chunk_tokens`` = C, the maximum of two moments of a chunk's backward):

    log-softmax backward   12·V·C + r·V·d (the head gradient summed so far) + r·d·N + m·c·C·d
    head matmul backward   (m ? 2r + c : 3r)·V·d (the chunk's head gradient, the sum, the new sum) + r·d·N + c·C·d

so below about C = d tokens the head-sized gradients dominate and smaller chunks gain little.

The activation term is the largest of the moments where they peak:

* no checkpointing: every block's saved tensors, the final norm, the weight copies and the loss
  at the start of the backward;
* checkpointing: each block keeps only its input (r·d per token and block); the peak is the end
  of the forward (autocast's cache still holds every weight copy until the forward's autocast
  region ends), the loss's backward, or one block's recomputation in the backward (its saved
  tensors plus about 4r·d per token of gradients in flight).

The total is an upper bound: gradients are counted whole although they are allocated during the
backward while the activations are being freed (with gradient accumulation they are all there).
A frozen base (``model.upscale.trainable: new``) saves less than this counts. CUDA's caching
allocator reserves more than it allocates, and the CUDA context is not counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from midus.model import MidusLM, ModelConfig
from midus.training.lightning_internals import fsdp_checkpoints_activations

log = logging.getLogger(__name__)

GIB = 2**30

PRECISIONS: dict[str, tuple[int, int]] = {
    "32-true": (4, 4),
    "64-true": (8, 8),
    "bf16-mixed": (4, 2),
    "16-mixed": (4, 2),
    "bf16-true": (2, 2),
    "16-true": (2, 2),
}
"""``trainer.precision`` → (bytes of a parameter and the residual stream r, bytes of matmul inputs c)."""
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process needs for a training step (see the module docstring for every term)."""

    weights: int
    """The parameters, r bytes each."""
    gradients: int
    """Gradients of the trainable parameters."""
    optimizer: int
    """AdamW's two moments per trainable parameter."""
    activations: int
    """What one micro-batch keeps for (and allocates in) its backward at the peak, weight copies included."""
    optimizer_step: int
    """Temporaries of the optimizer step (after the backward, so they compete with `activations`)."""
    activation_peak: str = "loss backward"
    """When the activations peak: ``loss backward``, ``forward end`` or ``block recompute``."""

    @property
    def total(self) -> int:
        """Upper bound of the peak: weights + gradients + optimizer + the larger of activations and step temporaries."""
        return self.weights + self.gradients + self.optimizer + max(self.activations, self.optimizer_step)

    def gib(self) -> dict[str, float]:
        """Every term and the total in GiB, rounded to 0.01."""
        terms = {
            "weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
            "activations": self.activations, "total": self.total,
        }
        return {name: round(value / GIB, 2) for name, value in terms.items()}


def precision_bytes(precision: str | int) -> tuple[int, int]:
    """(r, c) of a ``trainer.precision`` value (see `PRECISIONS`).

    Raises:
        ValueError: naming ``trainer.precision`` when the estimate does not know the value.
    """
    name = PRECISION_ALIASES.get(str(precision), str(precision))
    if name not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision!r}: the memory estimate knows {', '.join(PRECISIONS)}"
        )
    return PRECISIONS[name]


def _matmul_weights(module: nn.Module) -> int:
    """Elements of the weights autocast copies for a matmul: every linear layer and HIVE's head projections."""
    total = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    return total + sum(
        m.head_proj.numel() for m in module.modules() if isinstance(getattr(m, "head_proj", None), nn.Parameter)
    )


def block_bytes_per_token(config: ModelConfig, index: int, r: int, c: int, math_attention_tokens: int = 0) -> int:
    """Bytes block `index` saves for the backward per token (the module docstring's formula).

    `math_attention_tokens`: the sequence length T when attention runs the math kernel (adds c·H·T).
    """
    spec, memory = config.stack[index], config.memory
    mixed = c != r
    d, a, g, heads = config.d_model, config.attention_width, config.kv_heads * config.head_dim, config.n_heads
    normed = memory.query_norm != "none"
    retrieval = (8 * memory.n_subspaces + 20) * memory.retrieved_topk  # per query head: 36·k with two halves
    branch_linears = 0
    if spec.branch == "ffn":
        branch = 4 * c * config.ffn_width
        branch_linears = 2
    elif spec.branch == "hml":
        query_norm = (2 * r * a + (c * a if mixed else 0) + 8 * heads) if normed else 0
        branch = query_norm + retrieval * heads
        if memory.values == "hive":
            branch += c * heads * memory.latent_dim
    elif spec.branch in ("pkm", "multihead_pkm"):
        query_heads = 1 if spec.branch == "pkm" else memory.query_heads(config.n_heads)
        width = query_heads * memory.query_dim(d)
        branch = c * width + (2 * r * width + 8 * query_heads if normed else 0) + retrieval * query_heads
        branch_linears = 1
    else:
        # A branch registered after this estimate was written: count it as an FFN-sized one.
        branch, branch_linears = 4 * c * config.ffn_width, 2
    attention = 2 * c * (a + g) + 4 * heads + c * heads * math_attention_tokens
    if spec.block == "memory":
        norm = 2 * r * d + (3 * c if mixed else c) * d + 4
        extra = (r * d if memory.internal_residual else 0) + (c * d if memory.output_gate else 0)
        return norm + attention + branch + extra
    norm = 4 * r * d + ((3 + branch_linears) * c if mixed else 2 * c) * d + 8
    return norm + attention + branch


def estimate_training_memory(
    config: ModelConfig,
    trainable_parameters: int,
    batch_size: int,
    block_size: int,
    precision: str | int = "32-true",
    activation_checkpointing: bool = False,
    loss_chunk_tokens: int = 0,
    total_parameters: int | None = None,
    math_attention: bool = False,
) -> MemoryEstimate:
    """The memory of one training step of `config` on one process (module docstring: the formula).

    Args:
        config: the model (its `vocab_size` set); built on the meta device to count matmul weights.
        trainable_parameters: parameters that get gradients and AdamW state.
        batch_size: sequences per micro-batch (``data.batch_size``).
        block_size: tokens per sequence (``data.block_size``).
        precision: ``trainer.precision``.
        activation_checkpointing: ``model.compute.activation_checkpointing`` (or FSDP's policy).
        loss_chunk_tokens: ``model.compute.loss_chunk_tokens`` (0: full logits).
        total_parameters: all parameters; None counts them from `config`.
        math_attention: attention runs PyTorch's math kernel (float32 with grouped-query heads on CUDA).

    Raises:
        ValueError: an unknown precision (naming ``trainer.precision``), or a non-positive batch or block size.
    """
    if batch_size <= 0 or block_size <= 0:
        raise ValueError(f"data.batch_size={batch_size} and data.block_size={block_size} must be positive")
    r, c = precision_bytes(precision)
    mixed = c != r
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = MidusLM(config)
    if total_parameters is None:
        total_parameters = model.num_parameters()
    d, vocab, depth = config.d_model, config.vocab_size, config.depth
    tokens = batch_size * block_size
    per_block = [
        block_bytes_per_token(config, i, r, c, block_size if math_attention else 0) for i in range(depth)
    ]
    block_copies = [c * _matmul_weights(block) if mixed else 0 for block in model.blocks]
    head_copy = c * vocab * d if mixed else 0
    final_norm = (2 * r + c) * d * tokens
    rope = 2 * block_size * config.head_dim * r
    upcast = 8 + (c if mixed else 0)  # logits (if not already float32), their float32 copy, the log-softmax
    if loss_chunk_tokens:
        chunk = min(loss_chunk_tokens, tokens)
        loss_forward = upcast * vocab * chunk + head_copy  # one chunk at a time; the head copy sits in autocast's cache
        loss_backward = max(
            # a chunk's log-softmax backward, the head gradient summed so far, the hidden states' gradient
            12 * vocab * chunk + r * vocab * d + r * d * tokens + (c * chunk * d if mixed else 0),
            # a chunk's head matmul backward: its head gradient, the running sum and the new sum
            ((2 * r + c) if mixed else 3 * r) * vocab * d + r * d * tokens + c * chunk * d,
        )
    else:
        loss_forward = upcast * vocab * tokens + head_copy
        loss_backward = 12 * vocab * tokens + head_copy
    if activation_checkpointing:
        stored = r * d * tokens * depth + rope
        phases = {
            "forward end": stored + final_norm + sum(block_copies) + loss_forward,
            "loss backward": stored + final_norm + loss_backward,
            "block recompute": stored + max(
                tokens * (p + 4 * r * d) + copy for p, copy in zip(per_block, block_copies)
            ),
        }
    else:
        stored = tokens * sum(per_block) + rope + sum(block_copies)
        phases = {"loss backward": stored + final_norm + max(loss_forward, loss_backward)}
    peak = max(phases, key=phases.get)
    activations = phases[peak]
    return MemoryEstimate(
        weights=r * total_parameters,
        gradients=r * trainable_parameters,
        optimizer=2 * r * trainable_parameters,
        activations=activations,
        optimizer_step=r * trainable_parameters,
        activation_peak=peak,
    )


def _loss_chunk_tokens(module: pl.LightningModule) -> int:
    """``model.compute.loss_chunk_tokens`` of a `CausalLM` (0 for any other module)."""
    compute = getattr(module, "compute_config", None)
    return int(getattr(compute, "loss_chunk_tokens", 0) or 0)


class MemoryReport(pl.Callback):
    """Log the memory estimate when ``fit`` starts and, on CUDA, the measured peak after a few batches.

    Args:
        measure_after_batches: training batches after which the CUDA peak is read (the optimizer's
            state exists from the first step on, so a few steps reach the steady peak).
    """

    def __init__(self, measure_after_batches: int = 3) -> None:
        self.measure_after_batches = measure_after_batches
        self.estimate: MemoryEstimate | None = None
        self._micro_batch = (0, 0)
        self._batches = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = 0
        model = getattr(pl_module, "model", None)
        # The kit's data module keeps its constructor arguments (`midus.data.text_data.TextData.settings`).
        settings = getattr(getattr(trainer, "datamodule", None), "settings", None) or {}
        if not isinstance(model, MidusLM) or "batch_size" not in settings or "block_size" not in settings:
            return
        self._micro_batch = (int(settings["batch_size"]), int(settings["block_size"]))
        strategy = trainer.strategy
        fsdp = isinstance(strategy, FSDPStrategy)
        checkpointing = model.activation_checkpointing or (fsdp and fsdp_checkpoints_activations(strategy))
        try:
            _, c = precision_bytes(trainer.precision)
        except ValueError:  # e.g. transformer-engine: the run goes on without an estimate
            log.info("memory estimate: trainer.precision=%s is not one it knows; skipped", trainer.precision)
            return
        self.estimate = estimate_training_memory(
            model.config,
            model.num_parameters(trainable_only=True),
            *self._micro_batch,
            trainer.precision,
            checkpointing,
            _loss_chunk_tokens(pl_module),
            total_parameters=model.num_parameters(),
            math_attention=(
                c == 4 and model.config.kv_heads != model.config.n_heads and pl_module.device.type == "cuda"
            ),
        )
        self._report(trainer, checkpointing, fsdp)

    @rank_zero_only
    def _report(self, trainer: pl.Trainer, checkpointing: bool, fsdp: bool) -> None:
        gib = self.estimate.gib()
        log.info(
            "memory estimate per process (GiB): weights %.2f + gradients %.2f + AdamW %.2f + activations %.2f "
            "(micro-batch %d x %d, %s, activation checkpointing %s, loss chunk %s) = at most %.2f%s",
            gib["weights"], gib["gradients"], gib["optimizer"], gib["activations"], *self._micro_batch,
            trainer.precision, "on" if checkpointing else "off",
            _loss_chunk_tokens(trainer.lightning_module) or "off", gib["total"],
            " (parameter counts of this process's FSDP shard)" if fsdp else "",
        )
        for logger in trainer.loggers:
            logger.log_hyperparams({f"memory_estimate_gib/{name}": value for name, value in gib.items()})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._batches += 1
        if self._batches != self.measure_after_batches or pl_module.device.type != "cuda" or self.estimate is None:
            return
        peak = torch.cuda.max_memory_allocated(pl_module.device) / GIB
        self._report_peak(trainer, peak)

    @rank_zero_only
    def _report_peak(self, trainer: pl.Trainer, peak: float) -> None:
        log.info(
            "memory measured: peak allocated %.2f GiB after %d training batches (estimated at most %.2f GiB)",
            peak, self._batches, self.estimate.gib()["total"],
        )
        for logger in trainer.loggers:
            logger.log_metrics({"memory_estimate_gib/measured_peak": peak}, step=trainer.global_step)
