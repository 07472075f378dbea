"""The value read of every memory branch: weighted sums of looked-up value rows.

    slots (..., k), weights (..., k) ─ out[m] = Σ_j w[m, j] · table[slot[m, j]] ─ (..., width)

No (rows × k × width) tensor is formed: the sum is one `embedding_bag` call (sum mode with
per-sample weights), which reduces each bag in place. On CPU it runs as the custom op
`ops.flat_weighted_row_sum`, whose own backward replaces the stock one's slow per-element loop;
on other devices the stock `embedding_bag` backward is a fused kernel and is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from midus.model.retrieval.ops import flat_weighted_row_sum


def weighted_row_sum(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[..., j] · table[slots[..., j]]: slots and weights (..., k) → (..., width)."""
    lead, k = slots.shape[:-1], slots.shape[-1]
    slots, weights = slots.reshape(-1, k), weights.reshape(-1, k)
    if table.device.type == "cpu":
        flat = flat_weighted_row_sum(table, slots, weights)
    else:
        flat = F.embedding_bag(slots, table, per_sample_weights=weights.to(table.dtype), mode="sum")
    return flat.view(*lead, table.shape[1])


class MemoryValues(nn.Module):
    """A value table (rows × width) read by weighted sums; the optimizer gives it the memory group's
    rate (``model.memory_optimizer.learning_rate``).

    Args:
        rows: number of value rows (slots).
        width: width of one value row.
        zero_init: start at zero (makes the memory's output exactly zero at initialisation).
    """

    def __init__(self, rows: int, width: int, zero_init: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, width))
        if not zero_init:
            # The original PKM scale: a row has unit expected norm.
            nn.init.normal_(self.weight, std=width**-0.5)

    def forward(self, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """slots, weights (..., k) → (..., width)."""
        return weighted_row_sum(self.weight, slots, weights)
