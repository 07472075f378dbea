"""Weighted sums of looked-up value rows, without a (rows × k × width) tensor in the forward.

Every memory branch ends with out[m] = Σ_j w[m, j] · table[slot[m, j]]. The forward is one
`embedding_bag` call (sum mode with per-sample weights), which reduces each bag in place.
On CPU its stock backward is slow (a per-element loop for the weight gradient; measured in
benchmarks/branches.py), so `WeightedRowSum` has its own:

* d table: the transposed problem is again a weighted bag sum. Sorting the flat slots
  groups the (m, j) that read one row; `embedding_bag` over the output gradients with
  those groups as bags and w as per-sample weights gives every touched row's gradient.
* d w[m, j] = ⟨d out[m], table[slot[m, j]]⟩ is a sampled dense-dense matmul: the product
  d out · tableᵀ evaluated only at the (m, slot) pairs that were read, which
  `torch.sparse.sampled_addmm` does without gathering rows.

On other devices the stock `embedding_bag` backward is a fused kernel and is used as is.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class WeightedRowSum(torch.autograd.Function):
    """out (M, width) = Σ_j weights[:, j] · table[slots[:, j]], with the backward above."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        weights = weights.to(table.dtype)
        ctx.save_for_backward(table, slots, weights)
        return F.embedding_bag(slots, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        table, slots, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_table = bag_table_gradient(table, slots, weights, grad_out)
        if ctx.needs_input_grad[2]:
            grad_weights = _weight_gradient(table, slots, grad_out)
        return grad_table, None, grad_weights


def bag_table_gradient(
    table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """d table of out[m] = Σ_j weights[m, j] · table[slots[m, j]], given d out: (M, width).

    Row r's gradient is Σ over the reads (m, j) with slots[m, j] = r of weights[m, j] · d out[m]:
    a weighted bag sum again, with one bag per touched row. Sorting the flat reads groups them::

        slots (M, k) ─ flatten ─ sort ─ [r0 r0 r0 | r1 | r2 r2 …]   one run per touched row
        order         (position m·k + j of each sorted read; its bag m = order // k)
        embedding_bag(order // k, d out, offsets = run starts, per_sample_weights = w[order])
            → per_row (touched rows, width), scattered into a zero table at `rows`
    """
    k = slots.shape[1]
    sorted_slots, order = torch.sort(slots.flatten())
    rows, reads = torch.unique_consecutive(sorted_slots, return_counts=True)
    offsets = torch.cumsum(reads, 0) - reads
    per_row = F.embedding_bag(
        order // k,
        grad_out.to(table.dtype),
        offsets,
        mode="sum",
        per_sample_weights=weights.flatten()[order].to(table.dtype),
    )
    grad_table = torch.zeros_like(table)
    grad_table[rows] = per_row
    return grad_table


def _weight_gradient(table, slots, grad_out) -> torch.Tensor:
    n_bags, k = slots.shape
    # sampled_addmm has no bfloat16/half kernel on CPU; the k dot products are cheap in float32.
    dtype = table.dtype if table.dtype in (torch.float32, torch.float64) else torch.float32
    row_starts = torch.arange(0, n_bags * k + 1, k, device=slots.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # Bag m's pattern row lists its k slots (unsorted, repeats allowed): one output per read.
        pattern = torch.sparse_csr_tensor(
            row_starts,
            slots.flatten(),
            torch.zeros(n_bags * k, dtype=dtype, device=slots.device),
            (n_bags, table.shape[0]),
            check_invariants=False,
        )
        dots = torch.sparse.sampled_addmm(pattern, grad_out.to(dtype), table.to(dtype).t(), beta=0.0)
    return dots.values().view(n_bags, k).to(grad_out.dtype)


def weighted_row_sum(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[..., j] · table[slots[..., j]]: slots and weights (..., k) → (..., width)."""
    lead, k = slots.shape[:-1], slots.shape[-1]
    slots, weights = slots.reshape(-1, k), weights.reshape(-1, k)
    if table.device.type == "cpu":
        flat = WeightedRowSum.apply(table, slots, weights)
    else:
        flat = F.embedding_bag(slots, table, per_sample_weights=weights.to(table.dtype), mode="sum")
    return flat.view(*lead, table.shape[1])


class MemoryValues(nn.Module):
    """A value table (rows × width) read by weighted sums; the optimizer gives it `memory_lr`.

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
