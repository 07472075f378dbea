"""Weighted sums of looked-up value rows, without a (rows × k × width) tensor in the forward.

Every memory branch ends with out[m] = Σ_j w[m, j] · table[slot[m, j]]. The forward is one
`embedding_bag` call (sum mode with per-sample weights), which reduces each bag in place.
On CPU its stock backward is slow (a per-element loop for the weight gradient; measured in
benchmarks/branches.py), so `flat_weighted_row_sum` has its own:

* d table: the transposed problem is again a weighted bag sum. Sorting the flat slots
  groups the (m, j) that read one row; `embedding_bag` over the output gradients with
  those groups as bags and w as per-sample weights gives every touched row's gradient.
* d w[m, j] = ⟨d out[m], table[slot[m, j]]⟩ is a sampled dense-dense matmul: the product
  d out · tableᵀ evaluated only at the (m, slot) pairs that were read, which
  `torch.sparse.sampled_addmm` does without gathering rows.

On other devices the stock `embedding_bag` backward is a fused kernel and is used as is.

Why custom operators (``torch.library.custom_op``) and not a ``torch.autograd.Function``:
the table gradient once grouped reads with `unique_consecutive`, whose output length depends on
the data (now it groups them into one bag per table row, see `table_gradient_by_row`), and the
weight gradient builds a sparse CSR tensor. `torch.compile` traces the
backward of an autograd.Function at forward time, so both broke the graph (and
``fullgraph=True`` failed). A custom op is opaque to the compiler: only its output shapes
must be known (the fake implementations below), and a dense table gradient has the table's
shape whatever rows were read. The real implementations run the same kernels as before.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def op_namespace(module_name: str) -> str:
    """The ``torch.library`` namespace of the custom ops a module defines: ``midus`` for the kit's own.

    A Hugging Face custom-code export ships a copy of this package under another module name
    (`midus.checkpoint.hf_custom_code`), possibly of another kit version. Defining an op again
    under the same name replaces the first definition process-wide, so each copy gets its own
    namespace and runs its own code.
    """
    if module_name.startswith("midus."):
        return "midus"
    return "midus_" + hashlib.sha256(module_name.encode()).hexdigest()[:16]


OP_NAMESPACE = op_namespace(__name__)


@torch.library.custom_op(f"{OP_NAMESPACE}::flat_weighted_row_sum", mutates_args=())
def flat_weighted_row_sum(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out (M, width) = Σ_j weights[:, j] · table[slots[:, j]]; slots and weights (M, k)."""
    return F.embedding_bag(slots, table, per_sample_weights=weights.to(table.dtype), mode="sum")


@flat_weighted_row_sum.register_fake
def _flat_weighted_row_sum_shape(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return table.new_empty(slots.shape[0], table.shape[1])


def _save_lookup_inputs(ctx, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    table, slots, weights = inputs
    # The weights as given: `bag_table_gradient` casts the ones it reads to the table's dtype, as
    # the forward did (an elementwise cast, so the same values; the softmax keeps these anyway).
    ctx.save_for_backward(table, slots, weights)


def _lookup_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
    table, slots, weights = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_table = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_table = bag_table_gradient(table, slots, weights, grad_out)
    if ctx.needs_input_grad[2]:
        grad_weights = bag_weight_gradient(table, slots, grad_out)
    return grad_table, None, grad_weights


flat_weighted_row_sum.register_autograd(_lookup_backward, setup_context=_save_lookup_inputs)


@torch.library.custom_op(f"{OP_NAMESPACE}::bag_table_gradient", mutates_args=())
def bag_table_gradient(
    table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """d table of out[m] = Σ_j weights[m, j] · table[slots[m, j]], given d out: (M, width).

    The op around `table_gradient_by_row` (the compiler sees only its output shape, the table's).
    """
    return table_gradient_by_row(table, slots, weights, grad_out)


def table_gradient_by_row(
    table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """`bag_table_gradient`'s computation, on every device, without a host sync.

    Row r's gradient is Σ over the reads (m, j) with slots[m, j] = r of weights[m, j] · d out[m]:
    a weighted bag sum again, with one bag per table row. Sorting the flat reads groups them::

        slots (M, k) ─ flatten ─ sort ─ [r0 r0 r0 | r1 | | r3 r3 …]   one run per row, empty if unread
        order         (position m·k + j of each sorted read; its bag m = order // k)
        offsets       (rows,): where row r's run starts, searchsorted(sorted slots, r)
        embedding_bag(order // k, d out, offsets, per_sample_weights = w[order]) → (rows, width)

    Every shape is fixed by the input shapes: no `unique_consecutive` (the former grouping, whose
    output length is the number of touched rows), so on CUDA the sub-key and value backwards
    wait for no device-to-host copy. An unread row's bag is empty and sums to exactly zero; a read
    row's bag holds the same reads in the same order as before, so the gradient is the former
    one bit for bit (tests/test_subkey_sync.py).
    """
    k = slots.shape[1]
    sorted_slots, order = torch.sort(slots.flatten())
    offsets = torch.searchsorted(sorted_slots, torch.arange(table.shape[0], device=slots.device))
    return F.embedding_bag(
        order // k,
        grad_out.to(table.dtype),
        offsets,
        mode="sum",
        per_sample_weights=weights.flatten()[order].to(table.dtype),
    )


@bag_table_gradient.register_fake
def _bag_table_gradient_shape(
    table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    return table.new_empty(table.shape)  # embedding_bag's output: contiguous, the table's shape


@torch.library.custom_op(f"{OP_NAMESPACE}::bag_weight_gradient", mutates_args=())
def bag_weight_gradient(table: torch.Tensor, slots: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d weights (M, k) of out[m] = Σ_j weights[m, j] · table[slots[m, j]]: ⟨d out[m], table[slots[m, j]]⟩."""
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


@bag_weight_gradient.register_fake
def _bag_weight_gradient_shape(table: torch.Tensor, slots: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    return grad_out.new_empty(slots.shape)


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
