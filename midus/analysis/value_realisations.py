"""Fixed retrieval's machinery: the competing value realisations, the recording of what the
trained model retrieved, and the blocks that feed a realisation that record
(`midus.analysis.fixed_retrieval` is the command).

Every realisation replaces the value side of one HML memory block and is called with the
block's recorded retrieval, so only how the retrieved slots become an output differs:

    hive:      o_h = (Σ_i w_i · U[slot_i]) · P_h     U: n² × d_l, P_h: d_l × d_h (HML's own code path)
    per_head:  o_h = Σ_i w_i · V_h[slot_i]           V_h: n² × d_h, one table per head
    shared:    o_h = Σ_i w_i · V[slot_i]             V: n² × d_h, read by every head
    dense_ffn: down(silu(gate(n)) · up(n))           n = attn_norm(x); retrieval ignored
    dense_ffn_heads: the same FFN on the attention heads (the memory's query) instead of n
    zero:      0                                     the memory's output removed (an anchor)

`FixedRetrievalBlock` puts a realisation where a `MemoryBlock` was: it computes
x + realisation(recorded weights, recorded slots, attn_norm(x), heads) and never calls the
block's product keys. `CachedPrefix` replaces the frozen blocks before the first of them by
their recorded output.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from midus.model.branches.ffn import SwiGLUFeedForward
from midus.model.branches.hml import HeadwiseMemory
from midus.model.config import ModelConfig
from midus.model.memory_block import MemoryBlock
from midus.model.transformer import MidusLM, next_token_loss

REALISATIONS = ("hive", "per_head", "shared", "dense_ffn", "dense_ffn_heads")
"""Realisations that are fitted; ``zero`` and ``checkpoint`` are the anchors."""


@dataclass(frozen=True)
class MemoryShape:
    """The sizes of one HML branch that every realisation of it shares."""

    n_heads: int
    head_dim: int
    d_model: int
    n_slots: int
    latent_dim: int
    combine: str
    model_config: ModelConfig = field(compare=False)
    """The checkpoint's model config: realisations are the kit's own modules built from it."""

    @classmethod
    def of(cls, branch: HeadwiseMemory, config: ModelConfig) -> "MemoryShape":
        return cls(
            branch.n_heads,
            branch.head_dim,
            config.d_model,
            branch.n_slots,
            config.memory.latent_dim,
            branch.combine,
            config,
        )

    @property
    def out_width(self) -> int:
        """Width of one head's output: d_h when heads are concatenated, d_model when summed."""
        return self.head_dim if self.combine == "concat" else self.d_model

    @property
    def hive_parameters(self) -> int:
        """HIVE's value parameters: bank n²·d_l plus projections H·d_l·out_width."""
        return self.n_slots * self.latent_dim + self.n_heads * self.latent_dim * self.out_width

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden width whose 3·d·hidden parameters come closest to HIVE's value parameters."""
        return max(1, round(self.hive_parameters / (3 * self.d_model)))


class Realisation(nn.Module):
    """Maps a block's (recorded) retrieval and its inputs to the memory's output (batch, time, d).

    Subclasses implement ``forward(weights, slots, normed, heads)``: weights and slots
    (batch, time, H, k), normed = attn_norm(x) (batch, time, d), heads = the memory's query
    (batch, time, d) or None.
    """

    reads_heads = False
    """Needs the block's attention heads (then the frozen attention runs; it is skipped otherwise)."""


class HeadwiseValues(Realisation):
    """HML's values in one layout (``hive``, ``per_head`` or ``shared``), fresh as HML initialises
    them (values at zero), read through `HeadwiseMemory.read`: the method's own code path."""

    def __init__(self, shape: MemoryShape, layout: str) -> None:
        super().__init__()
        memory = dataclasses.replace(shape.model_config.memory, values=layout, zero_init_values=True)
        self.memory = HeadwiseMemory(dataclasses.replace(shape.model_config, memory=memory), layer_index=0)
        del self.memory.keys  # retrieval comes recorded: sub-keys would be dead parameters

    def forward(self, weights, slots, normed, heads):
        return self.memory.read(weights, slots)


class DenseFeedForward(Realisation):
    """The kit's SwiGLU FFN, ignoring retrieval; reads attn_norm(x), or the heads when `reads_heads`."""

    def __init__(self, shape: MemoryShape, reads_heads: bool = False) -> None:
        super().__init__()
        self.reads_heads = reads_heads
        self.ffn = SwiGLUFeedForward(dataclasses.replace(shape.model_config, ffn_hidden=shape.ffn_hidden), 0)
        # Fan-in scale on the inputs (as P_h), zero output (as U): starts at the zero anchor like the tables.
        nn.init.normal_(self.ffn.gate_proj.weight, std=shape.d_model**-0.5)
        nn.init.normal_(self.ffn.up_proj.weight, std=shape.d_model**-0.5)
        nn.init.zeros_(self.ffn.down_proj.weight)

    def forward(self, weights, slots, normed, heads):
        return self.ffn(heads if self.reads_heads else normed)


class NoValues(Realisation):
    """The memory's output removed: the block passes x through (the zero anchor)."""

    def forward(self, weights, slots, normed, heads):
        return torch.zeros_like(normed)


BUILDERS: dict[str, Callable[[MemoryShape], Realisation]] = {
    "hive": lambda shape: HeadwiseValues(shape, "hive"),
    "per_head": lambda shape: HeadwiseValues(shape, "per_head"),
    "shared": lambda shape: HeadwiseValues(shape, "shared"),
    "dense_ffn": DenseFeedForward,
    "dense_ffn_heads": lambda shape: DenseFeedForward(shape, reads_heads=True),
    "zero": lambda shape: NoValues(),
}


def build_realisation(name: str, shape: MemoryShape) -> Realisation:
    """A freshly initialised realisation (seed the global RNG first for a reproducible one)."""
    return BUILDERS[name](shape)


def trained_realisation(branch: HeadwiseMemory, shape: MemoryShape) -> Realisation:
    """The checkpoint's own trained values (its layout) as a realisation: HML's forward on given retrieval."""
    realisation = HeadwiseValues(shape, branch.layout)
    realisation.memory.load_state_dict(
        {name: value for name, value in branch.state_dict().items() if not name.startswith("keys.")}
    )
    return realisation


def value_parameters(branch: HeadwiseMemory) -> int:
    """Parameters of a trained HML branch's values (bank or tables, and projections), sub-keys excluded."""
    return sum(p.numel() for name, p in branch.named_parameters() if not name.startswith("keys."))


class RetrievalFeed:
    """What the fitting loop recorded for the batch being computed; read by the substituted blocks."""

    def __init__(self) -> None:
        self.retrieval: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """block index → (weights, slots), each (batch, time, H, k)."""
        self.prefix: torch.Tensor | None = None
        """Output of the frozen blocks before the first fitted memory block, (batch, time, d)."""


class CachedPrefix(nn.Module):
    """Stands in for a frozen block before the first fitted one: its output never changes, so the
    last of them returns the recorded output and the others pass x on (saves their compute)."""

    def __init__(self, block: nn.Module, feed: RetrievalFeed, last: bool) -> None:
        super().__init__()
        self.block, self.feed, self.last = block, feed, last

    def forward(self, x: torch.Tensor, rope, cache=None, start: int = 0) -> torch.Tensor:
        if not self.last:
            return x
        if self.feed.prefix is None or self.feed.prefix.shape != x.shape:
            raise RuntimeError(f"no recorded prefix output for this batch {tuple(x.shape)}")
        return self.feed.prefix


class FixedRetrievalBlock(nn.Module):
    """A memory block whose branch output comes from a realisation fed the recorded retrieval."""

    def __init__(self, block: MemoryBlock, realisation: Realisation, feed: RetrievalFeed, index: int) -> None:
        super().__init__()
        self.block, self.realisation, self.feed, self.index = block, realisation, feed, index

    def forward(self, x: torch.Tensor, rope, cache=None, start: int = 0) -> torch.Tensor:
        weights, slots = self.feed.retrieval[self.index]
        if weights.shape[:2] != x.shape[:2]:
            raise RuntimeError(
                f"block {self.index}: recorded retrieval {tuple(weights.shape[:2])} is not for this batch "
                f"{tuple(x.shape[:2])}"
            )
        normed = self.block.attn_norm(x)
        heads = None
        if self.realisation.reads_heads:
            heads = self.block.attn(normed, rope, cache, start)
            heads = x + heads if self.block.internal_residual else heads  # the query HML read
        return x + self.realisation(weights, slots.long(), normed, heads)


@dataclass
class Batch:
    """Token ids of one batch and what the trained model computed on it that is held fixed."""

    ids: torch.Tensor
    """(batch, block + 1): inputs are ids[:, :-1], targets ids[:, 1:]."""
    retrieval: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """block index → (weights float32, slots int32), each (batch, block, H, k)."""
    prefix: torch.Tensor | None = None
    """Output of the blocks before the first recorded memory block (None when it is block 0)."""

    @property
    def tokens(self) -> int:
        return self.ids[:, 1:].numel()


@dataclass
class Recording:
    blocks: list[int]
    shapes: dict[int, MemoryShape]
    train: list[Batch]
    val: list[Batch]
    checkpoint_losses: tuple[float, float] = (math.nan, math.nan)
    """The unmodified model's (train, val) loss on the batches: the 'checkpoint' anchor."""


def batch_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Next-token cross entropy (the training convention: logits of ids[:, :-1] against ids[:, 1:])."""
    return next_token_loss(logits, batch.ids[:, 1:])


def token_mean(losses: list[float], batches: list[Batch]) -> float:
    """Token-weighted mean of per-batch mean losses (a short last batch counts for what it holds)."""
    return sum(loss * batch.tokens for loss, batch in zip(losses, batches)) / sum(batch.tokens for batch in batches)


def loss_of(model: MidusLM, feed: RetrievalFeed, batch: Batch) -> torch.Tensor:
    """The loss of one batch, with what was recorded for it in the feed."""
    feed.retrieval, feed.prefix = batch.retrieval, batch.prefix
    return batch_loss(model(batch.ids[:, :-1]), batch)


@torch.no_grad()
def mean_loss(model: MidusLM, feed: RetrievalFeed, batches: list[Batch]) -> float:
    return token_mean([loss_of(model, feed, batch).item() for batch in batches], batches)


@torch.no_grad()
def record(model: MidusLM, blocks: list[int], train_ids: list[torch.Tensor], val_ids: list[torch.Tensor]) -> Recording:
    """Run the frozen model on the batches, keep every selected block's retrieval and the model's loss."""
    captured: dict = {}

    def keep(key):
        def hook(module, inputs, output) -> None:
            if key == "prefix":
                captured[key] = output.detach().clone()
            else:  # slots as int32: half the memory of the int64 the keys return
                captured[key] = (output[0].detach().float().clone(), output[1].detach().to(torch.int32))

        return hook

    handles = [model.blocks[i].branch.keys.register_forward_hook(keep(i)) for i in blocks]
    if blocks[0] > 0:
        handles.append(model.blocks[blocks[0] - 1].register_forward_hook(keep("prefix")))
    try:

        def run(ids: list[torch.Tensor]) -> tuple[list[Batch], float]:
            batches, losses = [], []
            for batch_ids in ids:
                captured.clear()
                batch = Batch(batch_ids)
                losses.append(batch_loss(model(batch_ids[:, :-1]), batch).item())
                batch.prefix = captured.pop("prefix", None)
                batch.retrieval = dict(captured)
                batches.append(batch)
            return batches, token_mean(losses, batches)

        (train, train_loss), (val, val_loss) = run(train_ids), run(val_ids)
    finally:
        for handle in handles:
            handle.remove()
    shapes = {i: MemoryShape.of(model.blocks[i].branch, model.config) for i in blocks}
    return Recording(blocks, shapes, train, val, (train_loss, val_loss))


def batched(blocks, size: int, order: list[int]) -> list[torch.Tensor]:
    """The ``input_ids`` of `blocks` (a packed dataset) at `order`, in batches of `size`."""
    return [blocks[order[i : i + size]]["input_ids"] for i in range(0, len(order), size)]
