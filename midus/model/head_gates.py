"""Per-head gates, hooked on only while a measurement runs, and the measurement itself: how much a
model relies on each head. `python -m midus head-importance` measures memory heads
(`midus.analysis.head_importance`); ``model.upscale.memory_allocation: head_importance`` measures
the base's attention heads before the surgery (`midus.upscale.head_allocation`).

A gate is an (H,) factor on each head's contribution:

* attention heads (`gated_attention_heads`): on head h's output a_h before W_O, a forward
  pre-hook on the block's ``o_proj``;
* memory heads (`gated_memory_heads`): on head h's k retrieval weights, a forward hook on the
  `ProductKeys` module; gate 0 removes the head's memory read in every value layout (its HIVE
  latent, its concat slice, its term of a sum).

Gate 1 leaves the forward exact (× 1), and a gate that requires grad gives gradient × activation
of the head. The hooks live only inside the context managers, so the model, its state_dict and its
own forward never carry measurement state.

`gated_head_losses` takes both measures over the same batches, as sums (callers divide by tokens):

* ablation: the summed token loss with head h's gate at 0 (one forward per head and batch), and
  the baseline with every gate at 1;
* gradient × activation (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"):
  |d summed loss / d gate_h| at gate 1, the absolute value taken per batch as in their code, so
  signs that cancel across batches still count.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from midus.model.retrieval.product_keys import ProductKeys
from midus.model.transformer import MidusLM, next_token_loss

Gates = dict[Hashable, "torch.Tensor | None"]
"""The live gates by label, read by the hooks at every forward; None leaves that label ungated."""


@contextmanager
def gated_attention_heads(model: MidusLM, blocks: list[int]) -> Iterator[Gates]:
    """A gate (n_heads,) on the attention heads' outputs of each block in `blocks`, before W_O.

    Yields the gates by block index, all None (ungated) at first; set ``gates[i] = gate`` to scale
    head h of block i by gate[h] from the next forward on.
    """
    gates: Gates = dict.fromkeys(blocks)
    handles = []
    for index in blocks:
        attn = model.blocks[index].attn
        if attn.o_proj is None:
            raise ValueError(f"block {index} has no attention output projection to gate (a memory block)")
        handles.append(attn.o_proj.register_forward_pre_hook(_attention_gate_hook(gates, index, attn.n_heads)))
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def _attention_gate_hook(gates: Gates, index: int, n_heads: int):
    def gate_heads(module: nn.Module, inputs: tuple[torch.Tensor]):
        gate = gates[index]
        if gate is None:
            return None
        merged = inputs[0]  # (batch, time, H·d_h), head-major
        heads = merged.unflatten(-1, (n_heads, -1)) * gate.to(merged)[:, None]
        return (heads.flatten(-2),)

    return gate_heads


@contextmanager
def gated_memory_heads(keys: dict[str, ProductKeys]) -> Iterator[Gates]:
    """A gate (H,) on the retrieval weights of every module of `keys` (label → module).

    Yields the gates by label, all None (ungated) at first; set ``gates[label] = gate`` to gate
    that module from its next forward on.
    """
    gates: Gates = dict.fromkeys(keys)
    handles = [module.register_forward_hook(_memory_gate_hook(gates, label)) for label, module in keys.items()]
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def _memory_gate_hook(gates: Gates, label: str):
    def gate_weights(module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]):
        gate = gates[label]
        if gate is None:
            return None
        weights, slots = output
        return weights * gate.to(weights)[:, None], slots  # (H, 1) over (..., H, k)

    return gate_weights


@dataclass
class HeadGateSums:
    """`gated_head_losses`' sums over the batches; tensors are (heads,) float64 by gate label."""

    baseline: float
    """Summed token loss with every gate at 1 (0 when ablation was not measured)."""
    ablated: dict[Hashable, torch.Tensor]
    """Summed token loss with head h's gate at 0 (zeros when not measured)."""
    grad_x_act: dict[Hashable, torch.Tensor]
    """Σ_batches |d summed loss / d gate_h| at gate 1 (zeros when not measured)."""
    tokens: int


def gated_head_losses(
    model: nn.Module, gates: Gates, n_heads: dict[Hashable, int], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ablation: bool = True, gradients: bool = True,
) -> HeadGateSums:
    """Ablation losses and gradient × activation of every head behind `gates` (the dict a
    ``gated_*_heads`` context yields), `n_heads` per label, over `batches` of (inputs, targets).

    The model runs in eval mode and its parameters get no gradients; both are restored after.
    """
    sums = HeadGateSums(
        0.0, {label: torch.zeros(n, dtype=torch.float64) for label, n in n_heads.items()},
        {label: torch.zeros(n, dtype=torch.float64) for label, n in n_heads.items()}, 0,
    )
    requires_grad = [parameter.requires_grad for parameter in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)  # only the gates need gradients: no parameter .grad, less memory
    try:
        for inputs, targets in batches:
            ones = {label: torch.ones(n, device=inputs.device) for label, n in n_heads.items()}
            if ablation:
                with torch.no_grad():
                    # The baseline goes through the gates too (× 1 is exact), so a head whose output
                    # is already zero has an ablated loss equal to it bit for bit.
                    gates.update(ones)
                    sums.baseline += float(next_token_loss(model(inputs), targets, reduction="sum"))
                    for label, n in n_heads.items():
                        for head in range(n):
                            ablated_gate = ones[label].clone()
                            ablated_gate[head] = 0.0
                            gates[label] = ablated_gate
                            sums.ablated[label][head] += float(next_token_loss(model(inputs), targets, reduction="sum"))
                        gates[label] = ones[label]
            if gradients:
                trainable = {label: gate.clone().requires_grad_(True) for label, gate in ones.items()}
                gates.update(trainable)
                loss = next_token_loss(model(inputs), targets, reduction="sum")
                grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
                for label, gradient in zip(trainable, grads):
                    if gradient is not None:  # None: no path from this gate to the loss, importance 0
                        sums.grad_x_act[label] += gradient.abs().double().cpu()
            sums.tokens += targets.numel()
    finally:
        gates.update(dict.fromkeys(n_heads))
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
    return sums
