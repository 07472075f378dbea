"""Eager against `torch.compile`: forward+backward time of each block kind.

Block kinds: the Transformer block with its SwiGLU FFN, and the memory block with HML+HIVE,
with PKM and with multi-head PKM. Each block is compiled whole with ``fullgraph=True`` (the
retrieval and value lookup are custom ops, so there is no graph break to fall back on) and
the default inductor backend, which ``model.compute.compile: true`` uses. The arms alternate
(every eager and compiled arm once per round) so that background load hits all alike; the
best of ``--repeats`` rounds is kept. The first call of a compiled arm compiles it: its
time is printed apart and left out of the rounds.

How to run
    python benchmarks/compiled_blocks.py --quick       # small CPU size, about a minute or two
    python benchmarks/compiled_blocks.py --threads 2   # d=256, 1024 tokens
    python benchmarks/compiled_blocks.py --device cuda --repeats 20

Numbers compare only within one run of this script; it is never run in CI.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py

from timing import best_times_ms, synchronize  # noqa: E402

from midus.model import LayerSpec, ModelConfig  # noqa: E402
from midus.model.block import TransformerBlock  # noqa: E402
from midus.model.memory_block import MemoryBlock  # noqa: E402
from midus.model.rotary import RotaryEmbedding  # noqa: E402

BLOCK_KINDS = {
    "transformer+ffn": LayerSpec("transformer", "ffn"),
    "memory+hml-hive": LayerSpec("memory", "hml"),
    "memory+pkm": LayerSpec("memory", "pkm"),
    "memory+multihead_pkm": LayerSpec("memory", "multihead_pkm"),
}


@dataclass
class Size:
    """The width, heads, product-key sizes and tokens every block kind is measured at."""

    d_model: int
    heads: int
    kv_heads: int
    n_subkeys: int
    topk: int
    latent_dim: int
    tokens: int

    def describe(self) -> str:
        return (
            f"d={self.d_model}, {self.heads} heads ({self.kv_heads} KV), n={self.n_subkeys} "
            f"({self.n_subkeys**2} slots), k={self.topk}, latent {self.latent_dim}, {self.tokens} tokens"
        )


QUICK = Size(d_model=64, heads=4, kv_heads=2, n_subkeys=32, topk=8, latent_dim=16, tokens=256)
FULL = Size(d_model=256, heads=4, kv_heads=2, n_subkeys=128, topk=32, latent_dim=64, tokens=1024)


def build_blocks(size: Size, device: torch.device) -> dict[str, nn.Module]:
    """One block of every kind at `size` (random memory values: a zero table hides nothing, but reads realistic)."""
    config = ModelConfig(
        vocab_size=8, d_model=size.d_model, n_heads=size.heads, n_kv_heads=size.kv_heads,
        layers=list(BLOCK_KINDS.values()),
        memory={"n_subkeys": size.n_subkeys, "topk": size.topk, "latent_dim": size.latent_dim, "values": "hive",
                "zero_init_values": False},
    )
    torch.manual_seed(0)
    kinds = {"transformer": TransformerBlock, "memory": MemoryBlock}
    return {
        name: kinds[spec.block](config, index).to(device) for index, (name, spec) in enumerate(BLOCK_KINDS.items())
    }


def train_step(block: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    """One forward+backward of `block` (or its compiled wrapper) on `x`."""

    def run() -> None:
        block.zero_grad(set_to_none=True)
        block(x, rope).square().mean().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument(
        "--repeats", type=int, default=0, help="alternating timed rounds per arm (0: 10 with --quick, else 5)"
    )
    parser.add_argument("--quick", action="store_true", help=f"small size: {QUICK.describe()}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = QUICK if args.quick else FULL
    repeats = args.repeats or (10 if args.quick else 5)

    blocks = build_blocks(size, device)
    rotary = RotaryEmbedding(size.d_model // size.heads, 10000.0).to(device)
    x = torch.randn(1, size.tokens, size.d_model, device=device)
    rope = rotary(torch.arange(size.tokens, device=device), x.dtype)
    arms, compile_seconds = {}, {}
    for name, block in blocks.items():
        arms[f"{name} eager"] = train_step(block, x, rope)
        arms[f"{name} compiled"] = train_step(torch.compile(block, fullgraph=True), x, rope)
        for mode in ("eager", "compiled"):
            start = time.perf_counter()
            arms[f"{name} {mode}"]()  # warm-up; compiles the compiled arm
            synchronize(device)
            if mode == "compiled":
                compile_seconds[name] = time.perf_counter() - start

    times = best_times_ms(arms, repeats, device)
    print(f"\n## eager vs torch.compile (inductor, fullgraph), forward+backward: {size.describe()}")
    print(f"device {device}, {torch.get_num_threads()} threads, best of {repeats} alternating rounds, torch "
          f"{torch.__version__}")
    print("| block | params | eager ms | compiled ms | compiled / eager | first compiled call s |")
    print("|---|---|---|---|---|---|")
    for name, block in blocks.items():
        eager, compiled = times[f"{name} eager"], times[f"{name} compiled"]
        params = sum(p.numel() for p in block.parameters())
        print(f"| {name} | {params:,} | {eager:.2f} | {compiled:.2f} | {compiled / eager:.2f} | "
              f"{compile_seconds[name]:.1f} |")


if __name__ == "__main__":
    main()
