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


@contextmanager
def gated_heads(keys: dict[str, ProductKeys]) -> Iterator[dict[str, torch.Tensor | None]]:
    """Hook a gate onto every module of `keys` (label → module) for the duration of the block.

    Yields the gates by label, all None (ungated) at first; set ``gates[label] = gate`` (H,) to
    gate that module from its next forward on.
    """
    gates: dict[str, torch.Tensor | None] = dict.fromkeys(keys)
    handles = [module.register_forward_hook(_gate_hook(gates, label)) for label, module in keys.items()]
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def _gate_hook(gates: dict[str, torch.Tensor | None], label: str):
    def gate_weights(module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]):
        gate = gates[label]
        if gate is None:
            return None
        weights, slots = output
        return weights * gate.to(weights)[:, None], slots  # (H, 1) over (..., H, k)

    return gate_weights
