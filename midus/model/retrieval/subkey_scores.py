"""Top-k sub-key scores with a backward that touches only the k kept scores.

Scoring a query half against its n sub-keys is a dense matmul, but only the top k of the n
scores are used. Autograd through ``topk`` would scatter their gradients into a dense
(…, n) tensor of zeros and push it back through two matmuls. The kept score of sub-key i
is ⟨q, K[i]⟩, so its gradients are sparse and have the shape of a weighted bag lookup:

    d q      = Σ_j g_j · K[i_j]        (an `embedding_bag` over the k kept sub-keys)
    d K[i]  += g_j · q  for i = i_j    (the transposed bag sum, `bag_table_gradient`)

With n = 256 and k = 32 this skips a 32 MB zero tensor and 8× the multiply-adds per block
at 1024 tokens and 16 heads (benchmarks/branches.py measures the whole branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from midus.model.retrieval.value_lookup import bag_table_gradient


def subkey_scores(halves: torch.Tensor, subkeys: torch.Tensor) -> torch.Tensor:
    """All sub-key scores: halves (..., H, 2, c) and subkeys (H, 2, n, c) → (..., H, 2, n)."""
    return torch.einsum("...hpc,hpnc->...hpn", halves, subkeys.to(halves.dtype))


class TopSubkeyScores(torch.autograd.Function):
    """(top-k scores, their sub-key indices), each (..., H, 2, k), sorted best first."""

    @staticmethod
    def forward(ctx, halves: torch.Tensor, subkeys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        top, index = subkey_scores(halves, subkeys).topk(k, dim=-1)
        ctx.save_for_backward(halves, subkeys, index)
        ctx.mark_non_differentiable(index)
        return top, index

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_top: torch.Tensor, _grad_index: None):
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
        if ctx.needs_input_grad[0]:
            grad_halves = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
            grad_halves = grad_halves.view(halves.shape).to(halves.dtype)
        if ctx.needs_input_grad[1]:
            grad_subkeys = bag_table_gradient(table, rows, weights, halves.reshape(-1, width)).view(subkeys.shape)
        return grad_halves, grad_subkeys, None
