"""Product-key retrieval shared by every memory branch (Lample et al., 2019).

Each of H heads owns two sub-key tables of n rows, so its memory has N = n² slots whose key
is the concatenation of one row from each table. A query q (width c) is split in halves:

    q ─┬─ q1 · K1ᵀ ─ top-k ─ s1 (sorted) ─┐
       └─ q2 · K2ᵀ ─ top-k ─ s2 (sorted) ─┴─ s1[i] + s2[j] for (i+1)(j+1) ≤ k ─ top-k ─ softmax

The full score of slot (a, b) = a·n + b is q1·K1[a] + q2·K2[b], so the best k slots of all N
are among the k × k pairs (i, j) of the two shortlists, shortlist position i holding K1 row
a and j holding K2 row b. With both shortlists sorted, pair (i, j) is beaten by
every pair (i' ≤ i, j' ≤ j), that is by (i+1)(j+1) - 1 others: it can only be in the top k
when (i+1)(j+1) ≤ k. Scoring just those pairs (about k·ln k, 119 instead of 1024 for
k = 32) is exact, ties aside.

Only the k kept scores of each shortlist carry a gradient: the selection is the custom op
`ops.kept_subkey_scores`, whose backward is a bag lookup over the kept sub-keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from midus.model.retrieval.ops import kept_subkey_scores


def subkey_scores(halves: torch.Tensor, subkeys: torch.Tensor) -> torch.Tensor:
    """All sub-key scores: halves (..., H, 2, c) and subkeys (H, 2, n, c) → (..., H, 2, n)."""
    return torch.einsum("...hpc,hpnc->...hpn", halves, subkeys.to(halves.dtype))


def top_subkey_scores(halves: torch.Tensor, subkeys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k scores, their sub-key indices), each (..., H, 2, k), sorted best first: the shortlists.

    halves (..., H, 2, c) are the query halves, subkeys (H, 2, n, c) the sub-key tables. The
    scores' gradient reaches both through the k kept scores only; the indices carry none.
    """
    # A plain matmul, which autocast and the compiler see as any other; autograd must not see
    # it: the custom op owns the gradient (see `ops` for why the matmul stays outside it).
    with torch.no_grad():
        scores = subkey_scores(halves, subkeys)
    return kept_subkey_scores(scores, halves, subkeys, k)


def sorted_pair_candidates(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shortlist positions (i, j) with (i+1)(j+1) ≤ k: the only pairs that can reach the top k."""
    pairs = [(i, j) for i in range(k) for j in range(k // (i + 1))]
    rows, cols = zip(*pairs)
    return torch.tensor(rows), torch.tensor(cols)


class QueryNorm(nn.Module):
    """Per-token normalisation of each query half, with a gain (and bias) per head and half."""

    def __init__(self, kind: str, n_heads: int, half_dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(n_heads, 2, half_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, 2, half_dim)) if kind == "layernorm" else None

    def forward(self, halves: torch.Tensor) -> torch.Tensor:
        # halves: (..., heads, 2, half_dim)
        if self.kind == "layernorm":
            normed = F.layer_norm(halves, halves.shape[-1:])
            return normed * self.weight + self.bias
        return F.rms_norm(halves, halves.shape[-1:]) * self.weight


class ProductKeys(nn.Module):
    """H independent product-key spaces: queries (..., H, c) → slot weights and indices (..., H, k).

    Args:
        n_heads: product-key spaces (one per query head).
        query_dim: width c of each head's query; split into two halves of c/2.
        n_subkeys: rows n of each half-key table; slots per head N = n².
        topk: slots read per query (k ≤ n).
        query_norm: ``none``, ``layernorm`` or ``rmsnorm`` on each query half.
        score_scale: factor on the k best scores before their softmax (inverse temperature).
        key_norm: ``none``, ``layernorm`` or ``rmsnorm`` of every sub-key row (no gain).
        head_topk: per-head k_h (``memory.head_topk``), or None for `topk` in every head. Every head
            then retrieves max k_h slots, sorted best first, and keeps its own k_h best: the rest get
            weight exactly zero (outside the softmax), so shapes stay (..., H, max k_h). Exact per
            head: the shortlists and candidate pairs for max k_h contain those for any k_h ≤ max k_h.
    """

    def __init__(
        self, n_heads: int, query_dim: int, n_subkeys: int, topk: int, query_norm: str = "none",
        score_scale: float = 1.0, key_norm: str = "none", head_topk: list[int] | None = None,
    ) -> None:
        super().__init__()
        if query_dim % 2:
            raise ValueError(f"product keys: query width {query_dim} cannot be split into two halves")
        if head_topk is not None:
            if len(head_topk) != n_heads or not all(0 < k <= n_subkeys for k in head_topk):
                raise ValueError(f"product keys: head_topk={head_topk} needs {n_heads} values in 1..{n_subkeys}")
            topk = max(head_topk)
        if not 0 < topk <= n_subkeys:
            raise ValueError(f"product keys: topk={topk} must be between 1 and n_subkeys={n_subkeys}")
        self.n_heads, self.n_subkeys, self.topk = n_heads, n_subkeys, topk
        self.score_scale, self.key_norm = score_scale, key_norm
        half = query_dim // 2
        # subkeys[h, 0] is K1_h and subkeys[h, 1] is K2_h, each n × c/2.
        self.subkeys = nn.Parameter(torch.empty(n_heads, 2, n_subkeys, half))
        nn.init.uniform_(self.subkeys, -1 / math.sqrt(half), 1 / math.sqrt(half))
        self.query_norm = QueryNorm(query_norm, n_heads, half) if query_norm != "none" else None
        pair_i, pair_j = sorted_pair_candidates(topk)
        self.register_buffer("pair_i", pair_i, persistent=False)
        self.register_buffer("pair_j", pair_j, persistent=False)
        # (H, topk) True at the first k_h sorted positions of head h; None: every head keeps all topk.
        self.head_keep: torch.Tensor | None
        keep = None if head_topk is None else torch.arange(topk) < torch.tensor(head_topk)[:, None]
        self.register_buffer("head_keep", keep, persistent=False)

    @property
    def n_slots(self) -> int:
        return self.n_subkeys**2

    def query_halves(self, queries: torch.Tensor) -> torch.Tensor:
        """queries (..., H, c) → normalised halves (..., H, 2, c/2): q1 and q2 of the sketch."""
        halves = queries.unflatten(-1, (2, -1))
        return halves if self.query_norm is None else self.query_norm(halves)

    def scored_subkeys(self) -> torch.Tensor:
        """The sub-key tables (H, 2, n, c/2) as scored: normalised per row under `key_norm`."""
        if self.key_norm == "layernorm":
            return F.layer_norm(self.subkeys, self.subkeys.shape[-1:])
        if self.key_norm == "rmsnorm":
            return F.rms_norm(self.subkeys, self.subkeys.shape[-1:])
        return self.subkeys

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (..., H, c) → (weights (..., H, k) summing to 1, slots (..., H, k) in [0, n²)).

        The k slots of a query come in no particular order. Analyses observe or steer this
        output through forward hooks (`slot_usage`, `midus.analysis.head_gate`), never here.
        """
        top, sub_index = top_subkey_scores(self.query_halves(queries), self.scored_subkeys(), self.topk)
        s1, s2 = top.unbind(-2)  # each shortlist sorted best first
        # index_select rather than advanced indexing: its backward is an index_add, not an index_put.
        pair_scores = s1.index_select(-1, self.pair_i) + s2.index_select(-1, self.pair_j)  # (..., H, P)
        # A bag's order is irrelevant, unless each head keeps only its first k_h (head_keep).
        best, pair = pair_scores.topk(self.topk, dim=-1, sorted=self.head_keep is not None)
        a = sub_index[..., 0, :].gather(-1, self.pair_i[pair])  # row of K1 of each kept pair
        b = sub_index[..., 1, :].gather(-1, self.pair_j[pair])  # row of K2
        slots = a * self.n_subkeys + b
        # Softmax in float32: under bf16 the k scores are often close enough to round together.
        scores = best.float() * self.score_scale
        if self.head_keep is not None:  # slots past k_h: weight exactly 0, no gradient
            scores = scores.masked_fill(~self.head_keep, float("-inf"))
        return torch.softmax(scores, dim=-1), slots


def brute_force_retrieval(keys: ProductKeys, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference search over all n² slots of every head (tests and benchmarks only)."""
    scores = subkey_scores(keys.query_halves(queries), keys.scored_subkeys())  # (..., H, 2, n)
    full = scores[..., 0, :, None] + scores[..., 1, None, :]  # (..., H, n, n): slot a·n + b
    best, slots = full.flatten(-2).topk(keys.topk, dim=-1)
    return torch.softmax(best.float() * keys.score_scale, dim=-1), slots
