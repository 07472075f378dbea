"""Top-k sub-key scores with a backward that touches only the k kept scores.

Scoring a query half against its n sub-keys is a dense matmul, but only the top k of the n
scores are used. Autograd through ``topk`` would scatter their gradients into a dense
(…, n) tensor of zeros and push it back through two matmuls. The kept score of sub-key i
is ⟨q, K[i]⟩, so its gradients are sparse and have the shape of a weighted bag lookup:

    d q      = Σ_j g_j · K[i_j]        (an `embedding_bag` over the k kept sub-keys)
    d K[i]  += g_j · q  for i = i_j    (the transposed bag sum, `bag_table_gradient`)

With n = 256 and k = 32 this skips a 32 MB zero tensor and 8× the multiply-adds per block
at 1024 tokens and 16 heads (benchmarks/branches.py measures the whole branch).

How it is built, so that `torch.compile` keeps it in one graph: the scoring matmul is a plain
op run without autograd (autocast and the compiler see it as any matmul), and the selection
is the ``torch.library`` custom op `kept_subkey_scores`, whose registered backward is the
sparse one above (its grouping of reads by sub-key, `bag_table_gradient`, is an opaque custom
op too). The backward has no data-dependent shape anywhere (the grouping gives every sub-key
row a bag, empty when unread), so on CUDA it never waits for a device-to-host copy: no host
sync per memory block per backward. The matmul stays outside the custom op because compiled
graphs run with autocast off: inside, it would run in float32 where eager autocast runs it in
bfloat16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The ops of one copy of the package share one namespace (`value_lookup.op_namespace`).
from midus.model.retrieval.value_lookup import OP_NAMESPACE, bag_table_gradient


def subkey_scores(halves: torch.Tensor, subkeys: torch.Tensor) -> torch.Tensor:
    """All sub-key scores: halves (..., H, 2, c) and subkeys (H, 2, n, c) → (..., H, 2, n)."""
    return torch.einsum("...hpc,hpnc->...hpn", halves, subkeys.to(halves.dtype))


def top_subkey_scores(halves: torch.Tensor, subkeys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k scores, their sub-key indices), each (..., H, 2, k), sorted best first.

    halves (..., H, 2, c) are the query halves, subkeys (H, 2, n, c) the sub-key tables. The
    scores' gradient reaches both through the k kept scores only; the indices carry none.
    """
    with torch.no_grad():  # autograd must not see the dense matmul: the custom op owns the gradient
        scores = subkey_scores(halves, subkeys)
    return kept_subkey_scores(scores, halves, subkeys, k)


@torch.library.custom_op(f"{OP_NAMESPACE}::kept_subkey_scores", mutates_args=())
def kept_subkey_scores(
    scores: torch.Tensor, halves: torch.Tensor, subkeys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., H, 2, n) of halves against subkeys → their top k and its indices, (..., H, 2, k).

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
    # ⟨q, K_hp[i]⟩ for its shortlist i. Stacking the 2H tables gives one table and one bag
    # per query half:
    #
    #   subkeys (H, 2, n, c) ─ reshape ─ table (2H·n, c)        row (h·2 + p)·n + i = K_hp[i]
    #   index   (…, H, 2, k) + (h·2 + p)·n ─ rows (Q, k)        Q = every (token, h, p)
    #   d q_Q   = Σ_j g[Q, j] · table[rows[Q, j]]               embedding_bag: (Q, c)
    #   d table = bag_table_gradient(table, rows, g, q)          reads grouped by sub-key row
    halves, subkeys, index = ctx.saved_tensors
    heads, _, n, width = subkeys.shape
    k = index.shape[-1]
    # Sub-key tables of every (head, half) stacked into one table of heads·2·n rows.
    table = subkeys.reshape(heads * 2 * n, width)
    first_row = torch.arange(heads * 2, device=index.device).view(heads, 2, 1) * n
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
