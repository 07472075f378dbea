"""A value table of which only chosen rows train: sparse memory finetuning (Lin et al. 2025).

Lin et al. ("Continual Learning via Sparse Memory Finetuning", arXiv 2510.15103) update only the
memory slots that the new data reads much more than the background does. `SparseRowValues` takes
the place of a branch's `MemoryValues` for that: the t chosen rows are one trainable (t, width)
parameter, the other rows one frozen parameter, and the forward scatters both into the full table
before the usual weighted read::

    table = zeros(rows, width)
    table[frozen_rows] = frozen           (rows - t, width), requires_grad False
    table[trainable_rows] = trainable     (t, width): the only rows that get a gradient
    out = Σ_j w_j · table[slot_j]         (`weighted_row_sum`, as `MemoryValues`)

So the optimizer holds state for t rows, not for the table, and every parameter count still adds
up to the table's size. The copies are exact, so before any step the output equals the full
table's bit for bit. Its ``state_dict`` is the full table under ``weight`` (trainable rows merged),
which is what `MemoryValues` saves and loads: a checkpoint holds an ordinary model, and loading one
into this module splits its ``weight`` again by the same rows.
"""

from __future__ import annotations

import torch
from torch import nn

from midus.model.retrieval.value_lookup import MemoryValues, weighted_row_sum


class SparseRowValues(nn.Module):
    """A value table whose `trainable_rows` train and whose other rows stay fixed.

    Args:
        table: the full table (rows × width), e.g. a `MemoryValues`' ``weight``; copied.
        trainable_rows: indices of the rows that train (distinct, any order; kept sorted).
    """

    def __init__(self, table: torch.Tensor, trainable_rows: torch.Tensor) -> None:
        super().__init__()
        rows = table.shape[0]
        chosen = torch.as_tensor(trainable_rows, dtype=torch.long, device=table.device).flatten().sort().values
        if chosen.numel() and (chosen[0] < 0 or chosen[-1] >= rows or bool((chosen[1:] == chosen[:-1]).any())):
            raise ValueError(f"trainable rows must be distinct indices in [0, {rows}), got {chosen.tolist()[:8]} ...")
        keep = torch.ones(rows, dtype=torch.bool, device=table.device)
        keep[chosen] = False
        self.register_buffer("trainable_rows", chosen, persistent=False)
        self.register_buffer("frozen_rows", keep.nonzero().flatten(), persistent=False)
        table = table.detach()
        self.trainable = nn.Parameter(table[chosen].clone())
        self.frozen = nn.Parameter(table[self.frozen_rows].clone(), requires_grad=False)

    @classmethod
    def from_values(cls, values: MemoryValues, trainable_rows: torch.Tensor) -> SparseRowValues:
        """The sparse form of an ordinary value table."""
        return cls(values.weight, trainable_rows)

    @property
    def weight(self) -> torch.Tensor:
        """The full table (rows × width): frozen rows and trainable rows scattered into place."""
        rows = self.frozen.shape[0] + self.trainable.shape[0]
        table = self.frozen.new_zeros(rows, self.frozen.shape[1])
        table = table.index_copy(0, self.frozen_rows, self.frozen)
        return table.index_copy(0, self.trainable_rows, self.trainable.to(table.dtype))

    def forward(self, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """slots, weights (..., k) → (..., width), as `MemoryValues.forward`."""
        return weighted_row_sum(self.weight, slots, weights)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # The merged table under `weight`, as an ordinary `MemoryValues` saves it.
        table = self.weight
        destination[prefix + "weight"] = table if keep_vars else table.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        table = state_dict[key]
        expected = (self.frozen.shape[0] + self.trainable.shape[0], self.frozen.shape[1])
        if tuple(table.shape) != expected:
            error_msgs.append(f"size mismatch for {key}: copying a table of shape {tuple(table.shape)}, "
                              f"the table here has {expected}")
            return
        with torch.no_grad():
            table = table.to(self.frozen.device)
            self.frozen.copy_(table[self.frozen_rows])
            self.trainable.copy_(table[self.trainable_rows])
        if strict:
            unexpected_keys.extend(
                name for name in state_dict if name.startswith(prefix) and name != key and "." not in name[len(prefix):]
            )

    def extra_repr(self) -> str:
        rows = self.frozen.shape[0] + self.trainable.shape[0]
        return f"rows={rows}, width={self.frozen.shape[1]}, trainable_rows={self.trainable.shape[0]}"
