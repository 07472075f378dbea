"""Residual branches and blocks side by side: forward+backward time, decode time, memory.

What it measures, all in one process, arms alternating (A, B, C, A, B, C, ...) so that
background load hits every arm alike; the best of ``--repeats`` runs of each arm is kept.

1. ``branches``: every registered branch alone at d=256, 4 heads, n=128 sub-keys, k=32,
   2048 tokens (PKM query width 256 per head, layer-normed queries): forward+backward ms,
   and training memory = bytes of the parameters plus the tensors autograd saves for the
   backward (counted with saved-tensor hooks; on CUDA, `max_memory_allocated` too).
2. ``vs product-key-memory``: the kit's multi-head PKM against `product_key_memory.PKM` at
   that same configuration (4 heads, dim_head 128 = the kit's query halves, layer norm on
   queries, 128 sub-keys, k=32, one N × d value table). Target: the kit ≥ 2× faster.
3. ``blocks``: at a Llama-like width (d=1024, 16 heads, 4 KV heads, SwiGLU hidden 2816)
   a MIDUS memory block with HML+HIVE (n=256, k=32, latent 64) against the Transformer
   block with FFN it replaces: forward+backward on 1024 tokens, and one decoding step
   with a KV cache after a 512-token prefill. Targets: memory block ≤ 0.5× the
   Transformer block's forward+backward time, ≤ 1.0× its decode-step time.

How to run
    pip install -e ".[bench]"            # product-key-memory for section 2 (skipped without it)
    python benchmarks/branches.py         # all sections, CPU with all cores
    python benchmarks/branches.py --device cuda --repeats 20
    python benchmarks/branches.py --sections blocks --threads 2

Numbers compare only within one run of this script; it is never run in CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py

from timing import best_times_ms  # noqa: E402

from midus.model import LayerSpec, ModelConfig  # noqa: E402
from midus.model.block import TransformerBlock  # noqa: E402
from midus.model.branches import available_branches, build_branch  # noqa: E402
from midus.model.kv_cache import KVCache  # noqa: E402
from midus.model.memory_block import MemoryBlock  # noqa: E402
from midus.model.rotary import RotaryEmbedding  # noqa: E402


def training_bytes(module: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Parameter bytes plus every tensor autograd saves for the backward of one forward."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if not isinstance(tensor, nn.Parameter):
            saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return saved + sum(p.numel() * p.element_size() for p in module.parameters())


def forward_backward(module: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        module(inputs).float().square().mean().backward()

    return run


def branch_config(d_model: int, heads: int, n_subkeys: int, topk: int, latent: int, **fields) -> ModelConfig:
    return ModelConfig(
        vocab_size=8, d_model=d_model, n_heads=heads, n_layers=1,
        memory={"n_subkeys": n_subkeys, "topk": topk, "latent_dim": latent, "zero_init_values": False,
                "query_norm": "layernorm", **fields.pop("memory", {})},
        **fields,
    )


def section_branches(args, device: torch.device) -> None:
    tokens = torch.randn(1, 2048, 256, device=device)
    variants = {name: (name, {}) for name in available_branches() if name != "hml"}
    variants |= {f"hml-{layout}": ("hml", {"values": layout}) for layout in ("hive", "per_head", "shared")}
    modules = {}
    for label, (name, memory) in variants.items():
        config = branch_config(256, 4, 128, 32, 64, memory=memory)
        modules[label] = build_branch(name, config, 0).to(device)
    times = best_times_ms({k: forward_backward(m, tokens) for k, m in modules.items()}, args.repeats, device)
    print("\n## branches alone: d=256, 4 heads, n=128 (16384 slots), k=32, 2048 tokens, forward+backward")
    print("| branch | params | fwd+bwd ms | vs ffn | training MiB (params + saved) |")
    print("|---|---|---|---|---|")
    for label, module in modules.items():
        mib = training_bytes(module, lambda: module(tokens)) / 2**20
        params = sum(p.numel() for p in module.parameters())
        print(f"| {label} | {params:,} | {times[label]:.1f} | {times[label] / times['ffn']:.2f} | {mib:.1f} |")


def section_vs_package(args, device: torch.device) -> None:
    try:
        from product_key_memory import PKM
    except ImportError:
        print("\n## vs product-key-memory: skipped (pip install product-key-memory)")
        return
    torch.manual_seed(0)
    theirs = PKM(256, heads=4, num_keys=128, topk=32, dim_head=128, use_layernorm=True).to(device)
    config = branch_config(256, 4, 128, 32, 64, memory={"pkm_heads": 4, "pkm_query_dim": 256})
    ours = build_branch("multihead_pkm", config, 0).to(device)
    same_size = sum(p.numel() for p in theirs.parameters()), sum(p.numel() for p in ours.parameters())
    tokens = torch.randn(1, 2048, 256, device=device)
    arms = {
        "product-key-memory PKM": forward_backward(theirs, tokens),
        "kit multihead_pkm": forward_backward(ours, tokens),
    }
    times = best_times_ms(arms, args.repeats, device)
    with torch.no_grad():
        forward_only = best_times_ms(
            {"theirs": lambda: theirs(tokens), "ours": lambda: ours(tokens)}, args.repeats, device
        )
    print("\n## kit multi-head PKM vs product-key-memory PKM: d=256, 4 heads, 128 sub-keys, k=32, 2048 tokens")
    print(f"parameters: theirs {same_size[0]:,}, kit {same_size[1]:,}")
    print("| arm | fwd+bwd ms | fwd ms |")
    print("|---|---|---|")
    print(f"| product-key-memory PKM | {times['product-key-memory PKM']:.1f} | {forward_only['theirs']:.1f} |")
    print(f"| kit multihead_pkm | {times['kit multihead_pkm']:.1f} | {forward_only['ours']:.1f} |")
    speedup = times["product-key-memory PKM"] / times["kit multihead_pkm"]
    print(
        f"speed-up of the kit, fwd+bwd: {speedup:.2f}x (target >= 2), "
        f"forward only: {forward_only['theirs'] / forward_only['ours']:.2f}x"
    )


def section_blocks(args, device: torch.device) -> None:
    config = ModelConfig(
        vocab_size=8,
        d_model=1024,
        n_heads=16,
        n_kv_heads=4,
        ffn_hidden=2816,
        layers=[LayerSpec("transformer", "ffn"), LayerSpec("memory", "hml")],
        memory={"n_subkeys": 256, "topk": 32, "latent_dim": 64, "values": "hive", "zero_init_values": False},
    )
    torch.manual_seed(0)
    blocks = {
        "transformer+ffn": TransformerBlock(config, 0).to(device),
        "memory+hml-hive": MemoryBlock(config, 1).to(device),
    }
    rotary = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    x = torch.randn(1, 1024, 1024, device=device)
    rope = rotary(torch.arange(1024, device=device), x.dtype)

    def train_step(block: nn.Module) -> Callable[[], None]:
        def run() -> None:
            block.zero_grad(set_to_none=True)
            block(x, rope).square().mean().backward()

        return run

    train = best_times_ms({name: train_step(b) for name, b in blocks.items()}, args.repeats, device)
    context = 512
    caches = {}
    for index, (name, block) in enumerate(blocks.items()):
        cache = KVCache(2, 1, context + 1, config.kv_heads, config.head_dim, device, x.dtype)
        with torch.no_grad():
            block(x[:, :context], rotary(torch.arange(context, device=device), x.dtype), cache, 0)
        caches[name] = cache
    step_rope = rotary(torch.arange(context, context + 1, device=device), x.dtype)

    def decode_step(name: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                blocks[name](x[:, context : context + 1], step_rope, caches[name], context)

        return run

    decode = best_times_ms({name: decode_step(name) for name in blocks}, args.repeats * 10, device)
    print("\n## blocks: d=1024, 16 heads (4 KV), SwiGLU 2816 vs HML+HIVE n=256 (65536 slots), k=32, latent 64")
    print("| block | params | fwd+bwd ms (1024 tokens) | decode ms (1 token, 512 cached) | training MiB |")
    print("|---|---|---|---|---|")
    for name, block in blocks.items():
        params = sum(p.numel() for p in block.parameters())
        mib = training_bytes(block, lambda: block(x, rope)) / 2**20
        print(f"| {name} | {params:,} | {train[name]:.1f} | {decode[name]:.3f} | {mib:.1f} |")
    train_ratio = train["memory+hml-hive"] / train["transformer+ffn"]
    decode_ratio = decode["memory+hml-hive"] / decode["transformer+ffn"]
    print(
        f"memory/transformer fwd+bwd time: {train_ratio:.2f} (target <= 0.5); "
        f"decode step: {decode_ratio:.2f} (target <= 1.0)"
    )


SECTIONS = {"branches": section_branches, "package": section_vs_package, "blocks": section_blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed rounds per arm; the best counts")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"# benchmarks/branches.py: torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"best of {args.repeats}"
    )
    for name in args.sections:
        SECTIONS[name](args, device)


if __name__ == "__main__":
    main()
