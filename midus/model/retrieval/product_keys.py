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

More sub-spaces (``memory.n_subspaces`` = p ≥ 2, as PEER's product keys): the query splits into p
parts of c/p, each scored against its own table of n sub-keys, so N = nᵖ slots; slot
(a_1, …, a_p) = a_1·n^(p−1) + … + a_p (mixed radix). The same argument keeps the tuples
(i_1, …, i_p) of shortlist positions with ∏(i_j + 1) ≤ k (`sorted_tuple_candidates`); p = 2 is the
pair case above, computed by the same operations in the same order.

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
    """All sub-key scores: halves (..., H, p, c) and subkeys (H, p, n, c) → (..., H, p, n)."""
    return torch.einsum("...hpc,hpnc->...hpn", halves, subkeys.to(halves.dtype))


def top_subkey_scores(halves: torch.Tensor, subkeys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k scores, their sub-key indices), each (..., H, p, k), sorted best first: the shortlists.

    halves (..., H, p, c) are the query parts (halves when p = 2), subkeys (H, p, n, c) the sub-key
    tables. The scores' gradient reaches both through the k kept scores only; the indices carry none.
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


def sorted_tuple_candidates(k: int, parts: int) -> torch.Tensor:
    """Shortlist positions (i_1, …, i_p) with ∏(i_j + 1) ≤ k, as a (p, P) tensor in lexicographic order.

    The tuples that can reach the top k of p sorted shortlists: any other is beaten by at least k
    tuples. For p = 2 these are `sorted_pair_candidates`, in the same order.
    """

    def extend(prefix: tuple[int, ...], budget: int) -> list[tuple[int, ...]]:
        # budget = ⌊k / ∏(i + 1) over the prefix⌋: the largest (i + 1) the next position may take.
        if len(prefix) == parts:
            return [prefix]
        return [t for i in range(budget) for t in extend((*prefix, i), budget // (i + 1))]

    return torch.tensor(extend((), k)).T.contiguous()


class QueryNorm(nn.Module):
    """Per-token normalisation of each query half (part), with a gain (and bias) per head and part."""

    def __init__(self, kind: str, n_heads: int, half_dim: int, parts: int = 2) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(n_heads, parts, half_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, parts, half_dim)) if kind == "layernorm" else None

    def forward(self, halves: torch.Tensor) -> torch.Tensor:
        # halves: (..., heads, parts, half_dim)
        if self.kind == "layernorm":
            normed = F.layer_norm(halves, halves.shape[-1:])
            return normed * self.weight + self.bias
        return F.rms_norm(halves, halves.shape[-1:]) * self.weight


class ProductKeys(nn.Module):
    """H independent product-key spaces: queries (..., H, c) → slot weights and indices (..., H, k).

    Args:
        n_heads: product-key spaces (one per query head).
        query_dim: width c of each head's query; split into `n_subspaces` parts of c/p.
        n_subkeys: rows n of each sub-key table; slots per head N = nᵖ.
        topk: slots read per query (k ≤ n).
        query_norm: ``none``, ``layernorm`` or ``rmsnorm`` on each query part.
        score_scale: factor on the k best scores before their softmax (inverse temperature).
        key_norm: ``none``, ``layernorm`` or ``rmsnorm`` of every sub-key row (no gain).
        n_subspaces: p ≥ 2 query parts and sub-key tables per head (2: the original halves).
        head_topk: per-head k_h (``memory.head_topk``), or None for `topk` in every head. Every head
            then retrieves max k_h slots, sorted best first, and keeps its own k_h best: the rest get
            weight exactly zero (outside the softmax), so shapes stay (..., H, max k_h). Exact per
            head: the shortlists and candidate tuples for max k_h contain those for any k_h ≤ max k_h.
    """

    def __init__(
        self, n_heads: int, query_dim: int, n_subkeys: int, topk: int, query_norm: str = "none",
        score_scale: float = 1.0, key_norm: str = "none", n_subspaces: int = 2, head_topk: list[int] | None = None,
    ) -> None:
        super().__init__()
        if n_subspaces < 2:
            raise ValueError(f"product keys: n_subspaces={n_subspaces} must be at least 2")
        if query_dim % n_subspaces:
            raise ValueError(f"product keys: query width {query_dim} cannot be split into {n_subspaces} equal parts")
        if head_topk is not None:
            if len(head_topk) != n_heads or not all(0 < k <= n_subkeys for k in head_topk):
                raise ValueError(f"product keys: head_topk={head_topk} needs {n_heads} values in 1..{n_subkeys}")
            topk = max(head_topk)
        if not 0 < topk <= n_subkeys:
            raise ValueError(f"product keys: topk={topk} must be between 1 and n_subkeys={n_subkeys}")
        self.n_heads, self.n_subkeys, self.topk = n_heads, n_subkeys, topk
        self.score_scale, self.key_norm, self.n_subspaces = score_scale, key_norm, n_subspaces
        half = query_dim // n_subspaces
        # subkeys[h, j] is K_{j+1} of head h (K1_h and K2_h when p = 2), each n × c/p.
        self.subkeys = nn.Parameter(torch.empty(n_heads, n_subspaces, n_subkeys, half))
        nn.init.uniform_(self.subkeys, -1 / math.sqrt(half), 1 / math.sqrt(half))
        self.query_norm = QueryNorm(query_norm, n_heads, half, n_subspaces) if query_norm != "none" else None
        # candidates[j] is the shortlist position in part j of every candidate tuple (pair_i, pair_j when p = 2).
        self.register_buffer("candidates", sorted_tuple_candidates(topk, n_subspaces), persistent=False)
        # (H, topk) True at the first k_h sorted positions of head h; None: every head keeps all topk.
        self.head_keep: torch.Tensor | None
        keep = None if head_topk is None else torch.arange(topk) < torch.tensor(head_topk)[:, None]
        self.register_buffer("head_keep", keep, persistent=False)

    @property
    def n_slots(self) -> int:
        return self.n_subkeys**self.n_subspaces

    def query_halves(self, queries: torch.Tensor) -> torch.Tensor:
        """queries (..., H, c) → normalised parts (..., H, p, c/p): q1 and q2 of the sketch when p = 2."""
        halves = queries.unflatten(-1, (self.n_subspaces, -1))
        return halves if self.query_norm is None else self.query_norm(halves)

    def scored_subkeys(self) -> torch.Tensor:
        """The sub-key tables (H, p, n, c/p) as scored: normalised per row under `key_norm`."""
        if self.key_norm == "layernorm":
            return F.layer_norm(self.subkeys, self.subkeys.shape[-1:])
        if self.key_norm == "rmsnorm":
            return F.rms_norm(self.subkeys, self.subkeys.shape[-1:])
        return self.subkeys

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (..., H, c) → (weights (..., H, k) summing to 1, slots (..., H, k) in [0, nᵖ)).

        The k slots of a query come in no particular order. Analyses observe or steer this
        output through forward hooks (`slot_usage`, `midus.model.head_gates`), never here.
        """
        top, sub_index = top_subkey_scores(self.query_halves(queries), self.scored_subkeys(), self.topk)
        shortlists = top.unbind(-2)  # s1 … sp, each sorted best first
        # index_select rather than advanced indexing: its backward is an index_add, not an index_put.
        tuple_scores = shortlists[0].index_select(-1, self.candidates[0])
        for part in range(1, self.n_subspaces):
            tuple_scores = tuple_scores + shortlists[part].index_select(-1, self.candidates[part])  # (..., H, P)
        # A bag's order is irrelevant, unless each head keeps only its first k_h (head_keep).
        best, pick = tuple_scores.topk(self.topk, dim=-1, sorted=self.head_keep is not None)
        # Mixed radix: slot = (…(a_1·n + a_2)·n + …)·n + a_p, a_j the row of K_j of each kept tuple.
        slots = sub_index[..., 0, :].gather(-1, self.candidates[0][pick])
        for part in range(1, self.n_subspaces):
            slots = slots * self.n_subkeys + sub_index[..., part, :].gather(-1, self.candidates[part][pick])
        # Softmax in float32: under bf16 the k scores are often close enough to round together.
        scores = best.float() * self.score_scale
        if self.head_keep is not None:  # slots past k_h: weight exactly 0, no gradient
            scores = scores.masked_fill(~self.head_keep, float("-inf"))
        return torch.softmax(scores, dim=-1), slots


def brute_force_retrieval(keys: ProductKeys, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference search over all nᵖ slots of every head (tests and benchmarks only)."""
    scores = subkey_scores(keys.query_halves(queries), keys.scored_subkeys())  # (..., H, p, n)
    full = scores[..., 0, :]  # (..., H, n^j) after part j: slot (a_1 … a_j) in mixed radix
    for part in range(1, keys.n_subspaces):
        full = (full[..., :, None] + scores[..., part, None, :]).flatten(-2)
    best, slots = full.topk(keys.topk, dim=-1)
    return torch.softmax(best.float() * keys.score_scale, dim=-1), slots
