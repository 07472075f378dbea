"""Modules of a model by the block they sit in: the labels every per-layer metric uses.

A metric of a memory block is logged as ``memory/<block index>/…`` (slot usage, the zeroed
memory, the summary's per-block records); this is the one place that turns a module's name
(``blocks.3.branch.keys``) into that label (``"3"``).
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def modules_by_block(model: nn.Module, wanted: Callable[[nn.Module], bool]) -> dict[str, nn.Module]:
    """Every module of `model` for which `wanted` holds, by block index (its own name outside the blocks)."""
    found = {}
    for name, module in model.named_modules():
        if wanted(module):
            match = _BLOCK.search(name + ".")
            found[match.group(1) if match else name] = module
    return found
