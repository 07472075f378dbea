"""The processes of a run as the probes see them: this one's rank, how many, and a sum over all.

The probes are plain PyTorch; the LightningModule passes its strategy's all-reduce in, so a
probe splits its questions over the processes and sums what they counted, as ``val/loss``'s
metric reduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class Processes:
    """This process's place in a run of `world_size` processes (1 and rank 0 alone)."""

    rank: int = 0
    world_size: int = 1
    sum: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)
    """The tensor summed over every process (the same tensor in a single-process run)."""
    device: torch.device | str = "cpu"
    """Where the tensors to sum must live (the model's device)."""
    collective_forwards: bool = False
    """Whether every process must run the same number of forwards (FSDP's forwards are collective)."""
