"""The retrieval kernels: every ``torch.library`` custom op of the memory branches, its fake
(shape-only) implementation and its backward. The model files (`product_keys`, `value_lookup`)
hold the maths and call these.

Ops (namespace ``midus`` for the kit's own copy, see `op_namespace`):

* ``flat_weighted_row_sum(table, slots, weights)``: out[m] = Σ_j w[m, j] · table[slot[m, j]],
  one `embedding_bag` call (no rows × k × width tensor). Its backward, for the CPU, where the
  stock `embedding_bag` backward is slow (a per-element loop for the weight gradient, measured
  in benchmarks/branches.py)::

      d table    = bag_table_gradient(table, slots, w, d out)   the transposed bag sum
      d w[m, j]  = bag_weight_gradient(table, slots, d out)     ⟨d out[m], table[slot[m, j]]⟩

* ``bag_table_gradient(table, slots, weights, grad_out)``: d table of that sum. Row r's gradient
  is a weighted bag sum of the d out[m] that read it; sorting the flat reads gives every table
  row one bag (empty when unread), so its shape is the table's whatever was read
  (`table_gradient_by_row`). No data-dependent shape, so on CUDA no device-to-host copy.
* ``bag_weight_gradient(table, slots, grad_out)``: d weights, a sampled dense-dense matmul:
  d out · tableᵀ evaluated only at the (m, slot) pairs read (`torch.sparse.sampled_addmm`).
* ``kept_subkey_scores(scores, halves, subkeys, k)``: the top k of the sub-key scores
  ⟨q, K[i]⟩ and their indices, differentiable in the query halves and the sub-keys through the
  k kept scores only. Autograd through ``topk`` would scatter k gradients into a dense (…, n)
  tensor of zeros and push it back through two matmuls; the kept scores' gradients have the
  shape of a weighted bag lookup instead::

      d q      = Σ_j g_j · K[i_j]        an `embedding_bag` over the k kept sub-keys
      d K[i]  += g_j · q  for i = i_j    the transposed bag sum, `bag_table_gradient`

  (n = 256, k = 32: no 32 MB zero tensor and 8× fewer multiply-adds per block at 1024 tokens
  and 16 heads). The scoring matmul stays outside the op, run without autograd by its caller
  (`product_keys.top_subkey_scores`): compiled graphs run with autocast off, so inside the op
  it would run in float32 where eager autocast runs it in bfloat16.

Why custom ops and not ``torch.autograd.Function``: `torch.compile` traces the backward of an
autograd.Function at forward time, and these backwards once had data-dependent shapes
(`unique_consecutive`) and build a sparse CSR tensor, so they broke the graph (and
``fullgraph=True`` failed). A custom op is opaque to the compiler: only its output shapes must
be known (the fakes below). The real implementations run the same kernels as before
(tests/test_compiled_memory.py, tests/test_subkey_sync.py).
"""

from __future__ import annotations

import hashlib
import warnings

import torch
import torch.nn.functional as F


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


# --- the weighted value read ---


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


# --- the two gradients of a weighted bag sum (used by both backwards) ---


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


# --- the top-k sub-key scores ---


@torch.library.custom_op(f"{OP_NAMESPACE}::kept_subkey_scores", mutates_args=())
def kept_subkey_scores(
    scores: torch.Tensor, halves: torch.Tensor, subkeys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., H, p, n) of halves against subkeys → their top k and its indices, (..., H, p, k).

    p = 2 halves, or p query parts of `ProductKeys` with ``n_subspaces`` = p.

    Differentiable in `halves` and `subkeys` (the scores are taken as their function, not as
    an input of their own: pass them without grad, as `top_subkey_scores` does).
    """
    top, index = scores.topk(k, dim=-1)
    return top, index


@kept_subkey_scores.register_fake
def _kept_subkey_scores_shape(
    scores: torch.Tensor, halves: torch.Tensor, subkeys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*scores.shape[:-1], k)
    return scores.new_empty(shape), scores.new_empty(shape, dtype=torch.long)


def _save_scoring_inputs(ctx, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int], output) -> None:
    _, halves, subkeys, _ = inputs
    _, index = output
    ctx.save_for_backward(halves, subkeys, index)


def _kept_subkey_scores_backward(ctx, grad_top: torch.Tensor, _grad_index: torch.Tensor | None):
    # Every (head h, half p) has its own n sub-keys; the k kept scores of a query half are
    # ⟨q, K_hp[i]⟩ for its shortlist i. Stacking the P·H tables (P halves or parts per head,
    # 2 by default) gives one table and one bag per query half:
    #
    #   subkeys (H, P, n, c) ─ reshape ─ table (P·H·n, c)       row (h·P + p)·n + i = K_hp[i]
    #   index   (…, H, P, k) + (h·P + p)·n ─ rows (Q, k)        Q = every (token, h, p)
    #   d q_Q   = Σ_j g[Q, j] · table[rows[Q, j]]               embedding_bag: (Q, c)
    #   d table = bag_table_gradient(table, rows, g, q)          reads grouped by sub-key row
    halves, subkeys, index = ctx.saved_tensors
    heads, parts, n, width = subkeys.shape
    k = index.shape[-1]
    # Sub-key tables of every (head, half) stacked into one table of heads·parts·n rows.
    table = subkeys.reshape(heads * parts * n, width)
    first_row = torch.arange(heads * parts, device=index.device).view(heads, parts, 1) * n
    rows = (index + first_row).reshape(-1, k)
    weights = grad_top.reshape(-1, k).to(table.dtype)
    grad_halves = grad_subkeys = None
    if ctx.needs_input_grad[1]:
        grad_halves = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
        grad_halves = grad_halves.view(halves.shape).to(halves.dtype)
    if ctx.needs_input_grad[2]:
        grad_subkeys = bag_table_gradient(table, rows, weights, halves.reshape(-1, width)).view(subkeys.shape)
    return None, grad_halves, grad_subkeys, None


kept_subkey_scores.register_autograd(_kept_subkey_scores_backward, setup_context=_save_scoring_inputs)
