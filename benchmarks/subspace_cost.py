"""Product-key retrieval over p = 2, 3, 4 sub-spaces at equal slot count N: time against p.

What it measures, all in one process, arms alternating (p = 2, 3, 4, p = 2, ...) so that
background load hits every arm alike; the best of ``--repeats`` runs of each arm is kept.
Each arm is one `ProductKeys` module (``memory.n_subspaces`` = p, N = nᵖ slots per head, the same
k, heads and query width, RMS-normed queries) on the same queries: forward (sub-key scores, p
shortlists, the candidate tuples with ∏(i_j + 1) ≤ k, their top k, softmax) and forward+backward
(gradients to the queries, the query norm and the sub-keys through the kept scores).

    N = 4096:  n = 64 (p 2), 16 (p 3), 8 (p 4), k = 8 (k ≤ n for every arm)
    N = 2^18:  n = 512 (p 2), 64 (p 3), k = 32

Besides the times it prints each arm's sub-key parameters (p·n·c/p = n·c per head) and the
candidate tuples scored per query head (P), the two sizes p changes. Ratios are to p = 2.

How to run
    python benchmarks/subspace_cost.py                       # CPU, one thread, 2048 tokens
    python benchmarks/subspace_cost.py --threads 2 --tokens 4096 --repeats 10
    python benchmarks/subspace_cost.py --device cuda --tokens 16384 --repeats 20

Numbers compare only within one run of this script; it is never run in CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py

from timing import best_times_ms  # noqa: E402

from midus.model.retrieval.product_keys import ProductKeys  # noqa: E402

GROUPS = {
    "N = 4096": {"topk": 8, "arms": {2: 64, 3: 16, 4: 8}},
    "N = 2^18": {"topk": 32, "arms": {2: 512, 3: 64}},
}
"""Per slot count: k and, per p, the n with nᵖ = N."""


def retrieval_runs(keys: ProductKeys, queries: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) of one retrieval; the backward reads a fixed function of the weights."""

    def forward() -> None:
        with torch.no_grad():
            keys(queries)

    def forward_backward() -> None:
        keys.zero_grad(set_to_none=True)
        queries.grad = None
        weights, _ = keys(queries)
        (weights * probe).sum().backward()

    probe = torch.randn(*queries.shape[:-1], keys.topk, device=queries.device)
    return forward, forward_backward


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--tokens", type=int, default=2048, help="query rows (batch × time)")
    parser.add_argument("--heads", type=int, default=4, help="product-key spaces (HML: attention heads)")
    parser.add_argument("--query_dim", type=int, default=48, help="query width c per head; divisible by 2, 3 and 4")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"product-key retrieval, {args.tokens} tokens × {args.heads} heads, query width {args.query_dim}, "
          f"rmsnorm queries, {device.type}" + (f", {args.threads} thread(s)" if device.type == "cpu" else "")
          + f"; best of {args.repeats}, ms")
    for group, spec in GROUPS.items():
        k = spec["topk"]
        runs: dict[str, Callable[[], None]] = {}
        sizes: dict[int, tuple[int, int, int]] = {}
        for parts, n in spec["arms"].items():
            torch.manual_seed(0)
            keys = ProductKeys(args.heads, args.query_dim, n, k, "rmsnorm", n_subspaces=parts).to(device)
            queries = torch.randn(args.tokens, args.heads, args.query_dim, device=device, requires_grad=True)
            runs[f"{parts} forward"], runs[f"{parts} forward+backward"] = retrieval_runs(keys, queries)
            sizes[parts] = (n, keys.subkeys[0].numel(), keys.candidates.shape[1])
        times = best_times_ms(runs, args.repeats, device)
        print(f"\n{group}, k = {k}")
        print(f"{'p':>3} {'n':>5} {'sub-keys/head':>14} {'tuples P':>9} {'forward':>9} {'ratio':>6} "
              f"{'fwd+bwd':>9} {'ratio':>6}")
        for parts, (n, subkeys, tuples) in sizes.items():
            forward, both = times[f"{parts} forward"], times[f"{parts} forward+backward"]
            print(f"{parts:>3} {n:>5} {subkeys:>14,} {tuples:>9} {forward:>9.2f} {forward / times['2 forward']:>6.2f} "
                  f"{both:>9.2f} {both / times['2 forward+backward']:>6.2f}")


if __name__ == "__main__":
    main()
