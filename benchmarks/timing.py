"""Timing shared by the benchmarks: arms alternate (A, B, C, A, B, C, ...) so background load
hits every arm alike, and the best of the repeats counts."""

from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (CUDA runs ahead of Python); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_times_ms(arms: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best wall time of each arm over `repeats` alternating rounds, after one warm-up call each."""
    for run in arms.values():
        run()
    best = {name: float("inf") for name in arms}
    for _ in range(repeats):
        for name, run in arms.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best
