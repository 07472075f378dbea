"""Per-head gates on product-key retrieval weights, attached by forward hooks for an analysis.

A gate is an (H,) factor on each head's k retrieval weights: gate 0 removes head h's memory
read in every value layout (its HIVE latent, its concat slice, its term of a sum), gate 1
leaves it exact (× 1), and a gate that requires grad gives gradient × activation of each
head's read. The hooks live only inside `gated_heads`, so the model, its state_dict and the
retrieval's own forward never carry analysis state.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from midus.model.retrieval.product_keys import ProductKeys


class HeadGates:
    """The gate of every gated `ProductKeys` module by label; None leaves a module untouched."""

    def __init__(self, labels: list[str]) -> None:
        self.gates: dict[str, torch.Tensor | None] = dict.fromkeys(labels)

    def set(self, label: str, gate: torch.Tensor | None) -> None:
        """Gate the module `label` with `gate` (H,) from its next forward on."""
        self.gates[label] = gate


@contextmanager
def gated_heads(keys: dict[str, ProductKeys]) -> Iterator[HeadGates]:
    """Attach a gate hook to every module of `keys` (label → module) for the duration of the block."""
    gates = HeadGates(list(keys))
    handles = [module.register_forward_hook(_gate_hook(gates, label)) for label, module in keys.items()]
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def _gate_hook(gates: HeadGates, label: str):
    def gate_weights(module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]):
        gate = gates.gates[label]
        if gate is None:
            return None
        weights, slots = output
        return weights * gate.to(weights)[:, None], slots  # (H, 1) over (..., H, k)

    return gate_weights
