"""Switch memory branches off: the question "is the memory used?" as a forward hook.

`zeroed_memory` makes the output of product-key memory branches exactly zero for the duration
of a ``with`` block, so the block around each one passes its residual stream (and its
attention) on as if the branch were absent. Validation with and without it gives
``memory_zeroed_delta``: what the memories contribute to loss and recall.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from midus.model.block_labels import modules_by_block
from midus.model.branches.registry import Branch


def memory_branches(model: nn.Module) -> dict[str, Branch]:
    """Every product-key memory branch of a model by block index (``"3"`` for ``blocks.3``)."""
    return modules_by_block(model, lambda module: isinstance(module, Branch) and module.is_product_key_memory)


def _zero_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


@contextmanager
def zeroed_memory(model: nn.Module, blocks: Iterable[str] | None = None) -> Iterator[list[str]]:
    """Zero the output of the memory branches of `blocks` (block indices; None: all) inside the block.

    Yields the block indices zeroed. Raises ValueError for an index without a memory branch.
    """
    branches = memory_branches(model)
    chosen = list(branches) if blocks is None else list(blocks)
    unknown = [block for block in chosen if block not in branches]
    if unknown:
        raise ValueError(f"blocks {unknown} have no memory branch; the memory blocks are {list(branches)}")
    handles = [branches[block].register_forward_hook(_zero_output) for block in chosen]
    try:
        yield chosen
    finally:
        for handle in handles:
            handle.remove()
