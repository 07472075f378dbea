"""One command, one table: what the kit does on one GPU (sized for at most 8 minutes on an H100).

    python benchmarks/gpu_check.py                        # on the GPU, bf16 (the check to record)
    python benchmarks/gpu_check.py --tiny --device cpu    # every section at toy size: a smoke run

Sections, each a block of rows of the one printed table:

1. **train**: bf16-mixed training steps of a Llama-3.2-1B-shaped random model (d 2048, 16 blocks,
   32 heads, 8 KV heads, FFN 8192, vocabulary 128,256, tied): the base, interleaved DUS (a copy
   after every 2nd block: 24 blocks) and MIDUS (a memory block after every 2nd block: 16 + 8),
   with the memory settings of experiments/gpu/llama32_1b.yaml, activation checkpointing and the
   chunked loss; step time, tokens/s, MFU (6 N + 12 L d T FLOPs per token against the card's
   dense bf16 peak) and peak memory against the kit's printed estimate
   (`midus.training.memory_estimate`).
2. **cost**: one block's training step, prefill and decode at d 2048, memory blocks against the
   Transformer block they replace (`benchmarks/cost_scaling.py`'s arms and timing).
3. **lookup**: the memory value lookup's forward and backward (weighted row sums over a table of
   N slots) as effective bandwidth against the card's peak HBM bandwidth.
4. **syncs**: host synchronisations in one training step of a memory block, counted with
   ``torch.cuda.set_sync_debug_mode`` (should be 0), and in a whole MIDUS step.

Numbers compare only within one run; never run in CI (CI has no GPU). experiments/README.md holds
the recorded table with the card's name.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost_scaling import ARMS, MEMORY_ARMS, Point, measure_point  # noqa: E402
from timing import best_times_ms, synchronize  # noqa: E402

from midus.model.retrieval.value_lookup import weighted_row_sum  # noqa: E402

PEAKS = {  # device name fragment -> (dense bf16 TFLOP/s, HBM TB/s), from the vendors' data sheets
    "H200": (989.0, 4.8),
    "H100 SXM": (989.0, 3.35),
    "H100 80GB HBM3": (989.0, 3.35),
    "H100 PCIe": (756.0, 2.0),
    "H100 NVL": (835.0, 3.9),
    "A100": (312.0, 2.0),
    "L4": (121.0, 0.3),
    "RTX 4090": (165.0, 1.0),
}


def card_peaks(device: torch.device, tflops: float, bandwidth: float) -> tuple[str, float, float]:
    """(name, peak bf16 TFLOP/s, peak TB/s) of `device`; the flags win, unknown cards give NaN."""
    if device.type != "cuda":
        return "cpu", tflops or math.nan, bandwidth or math.nan
    name = torch.cuda.get_device_name(device)
    for fragment, (peak, hbm) in PEAKS.items():
        if fragment in name:
            return name, tflops or peak, bandwidth or hbm
    return name, tflops or math.nan, bandwidth or math.nan


class Table:
    """The one table: rows of (section, arm, measure, value, note), printed as Markdown at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, section: str, arm: str, measure: str, value: str, note: str = "") -> None:
        self.rows.append((section, arm, measure, value, note))
        print(f"  {section:7s} {arm:16s} {measure:28s} {value:>12s}  {note}", flush=True)

    def markdown(self) -> str:
        lines = ["| section | arm | measure | value | note |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def cost_section(args: argparse.Namespace, table: Table) -> None:
    """Memory blocks against the Transformer block at d 2048 (cost_scaling's arms and timing)."""
    d = 128 if args.tiny else 2048
    points = [Point(d, 64, 2, 16, 8, 16)] if args.tiny else [Point(d, 2048, 4, 256, 32, 64),
                                                             Point(d, 512, 16, 256, 32, 64)]
    options = argparse.Namespace(device=args.device, dtype=args.dtype, pkm_heads=4, repeats=args.repeats)
    for point in points:
        times = measure_point(point, list(ARMS), options)
        where = f"d {point.d_model}, B {point.batch} x T {point.tokens}, N {point.n_subkeys ** 2}, k {point.topk}"
        for step, by_arm in times.items():
            table.add("cost", "transformer", f"{step} ms", f"{by_arm['transformer']:.3f}", where)
            for arm in MEMORY_ARMS:
                table.add("cost", arm, f"{step} / transformer", f"{by_arm[arm] / by_arm['transformer']:.2f}", where)


def lookup_section(args: argparse.Namespace, peak_tb_s: float, table: Table) -> None:
    """Effective bandwidth of the value lookup: bytes of the rows read (forward) and of the rows'
    gradients written plus the rows read again for the weight gradient (backward)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows, width, queries, k = (4096, 32, 512, 8) if args.tiny else (65536, 64, 4 * 2048 * 32, 32)
    table_weights = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
    slots = torch.randint(0, rows, (queries, k), device=device)
    weights = torch.softmax(torch.randn(queries, k, device=device), -1).to(dtype).requires_grad_(True)
    grad = torch.randn(queries, width, device=device, dtype=dtype)
    element = torch.finfo(dtype).bits // 8
    row_bytes = queries * k * width * element  # every (query, slot) reads one row of `width`

    def forward() -> None:
        with torch.no_grad():
            weighted_row_sum(table_weights, slots, weights)

    def forward_backward() -> None:
        table_weights.grad = weights.grad = None
        weighted_row_sum(table_weights, slots, weights).backward(grad)

    times = best_times_ms({"forward": forward, "forward+backward": forward_backward}, args.repeats, device)
    note = f"{queries} queries x k {k} of {rows} rows x {width}, {args.dtype}"
    moved = {"forward": row_bytes, "forward+backward": 3 * row_bytes}  # fwd read; bwd write + read again
    for name, ms in times.items():
        rate = moved[name] / (ms / 1e3) / 1e12
        table.add("lookup", "weighted rows", f"{name} TB/s", f"{rate:.3f}", f"{rate / peak_tb_s:.0%} of peak; {note}")


def count_syncs(run) -> int:
    """Host synchronisations `run()` makes on CUDA (`torch.cuda.set_sync_debug_mode` warnings)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def sync_section(args: argparse.Namespace, memory_block, memory_step, table: Table) -> None:
    """Syncs of one memory block's training step (forward + backward) and of a whole MIDUS step."""
    if torch.device(args.device).type != "cuda":
        table.add("syncs", "memory block", "per training step", "n/a", "CUDA only")
        return
    table.add("syncs", "memory block", "per training step", str(count_syncs(memory_block)), "should be 0")
    table.add("syncs", "midus model", "per training step", str(count_syncs(memory_step)), "optimizer included")


def timed(run, steps: int, device: torch.device) -> float:
    """Median seconds of `steps` calls of `run` after two warm-up calls."""
    run()
    run()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


LLAMA32_1B = dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                  tie_embeddings=True, rope_theta=500000.0)
TINY = dict(vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=128, tie_embeddings=True)
RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "gpu" / "llama32_1b.yaml"


def recipe_memory() -> dict:
    """The memory settings of experiments/gpu/llama32_1b.yaml (the check measures what the recipe trains)."""
    import yaml

    return yaml.safe_load(RECIPE.read_text(encoding="utf-8"))["model"]["upscale"]["memory"]


def build_arms(args: argparse.Namespace):
    """Yields (arm, model) for the base, interleaved DUS and MIDUS on `args.device` (fp32 weights),
    one at a time, so a finished arm can be freed before the next is built."""
    from midus.model import MidusLM, ModelConfig
    from midus.upscale import UpscaleConfig, upscale

    torch.manual_seed(0)
    base = MidusLM(ModelConfig(**(TINY if args.tiny else LLAMA32_1B))).to(args.device)
    memory = {**recipe_memory(), **({"n_subkeys": 16, "topk": 8, "latent_dim": 16} if args.tiny else {})}
    memory["zero_init_values"] = False  # random values: time the lookups a trained memory does
    yield "base", base
    yield "dus_interleave", upscale(base, UpscaleConfig(method="dus_interleave", every=2))[0]
    yield "midus_hml_hive", upscale(base, UpscaleConfig(method="midus", every=2, branch="hml", memory=memory))[0]


def train_section(args: argparse.Namespace, peak_tflops: float, table: Table):
    """bf16-mixed steps of each arm; returns (one memory block's train step, a MIDUS train step) for the sync count."""
    from midus.training.memory_estimate import estimate_training_memory

    device = torch.device(args.device)
    batch, tokens = (2, 64) if args.tiny else (args.batch, 2048)
    chunk = 0 if args.tiny else 2048
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    kept = None
    for name, model in build_arms(args):
        model.activation_checkpointing = True
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        ids = torch.randint(0, model.config.vocab_size, (batch, tokens + 1), device=device)

        def step(model=model, optimizer=optimizer, ids=ids) -> None:
            with autocast:
                loss = model(ids[:, :-1], targets=ids[:, 1:], loss_chunk_tokens=chunk) if chunk else (
                    torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten()))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(step, args.steps, device)
        params = model.num_parameters()
        estimate = estimate_training_memory(model.config, params, batch, tokens, "bf16-mixed", True, chunk)
        non_embedding = params - model.embed.weight.numel()
        flops_per_token = 6 * non_embedding + 12 * model.config.depth * model.config.d_model * tokens
        rate = batch * tokens / seconds
        note = f"{params / 1e9:.3f} B params, {model.config.depth} blocks, B {batch} x T {tokens}"
        table.add("train", name, "step ms", f"{seconds * 1e3:.1f}", note)
        table.add("train", name, "tokens/s", f"{rate:,.0f}")
        table.add("train", name, "MFU", f"{rate * flops_per_token / (peak_tflops * 1e12):.1%}", "6N + 12 L d T")
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
        table.add("train", name, "peak GiB / estimate GiB", f"{peak:.1f} / {estimate.total / 2**30:.1f}",
                  "estimate: midus.training.memory_estimate")
        if name == "midus_hml_hive":
            kept = (model, step)  # for the sync count
        del model, optimizer, step  # free the arm (the base stays: the next arm is built from it)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    midus_model, midus_step = kept
    block = next(b for b in midus_model.blocks if type(b).__name__ == "MemoryBlock")
    x = torch.randn(batch, tokens, midus_model.config.d_model, device=device, requires_grad=True)
    rope = midus_model.rotary(torch.arange(tokens, device=device), torch.float32)

    def block_step() -> None:
        with autocast:
            block(x, rope).float().square().mean().backward()

    return block_step, midus_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="cost and lookup sections")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run of every section in seconds")
    parser.add_argument("--batch", type=int, default=4, help="sequences of 2048 tokens per training step")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per arm (the median counts)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds of the cost and lookup timings")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="the card's dense bf16 peak (0: by name)")
    parser.add_argument("--peak_tb_s", type=float, default=0.0, help="the card's HBM bandwidth (0: by name)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name, tflops, bandwidth = card_peaks(device, args.peak_tflops, args.peak_tb_s)
    started = time.perf_counter()
    print(f"# benchmarks/gpu_check.py: {name}, torch {torch.__version__}, peaks {tflops} TFLOP/s bf16, "
          f"{bandwidth} TB/s{' (tiny)' if args.tiny else ''}", flush=True)
    table = Table()
    block_step, midus_step = train_section(args, tflops, table)
    sync_section(args, block_step, midus_step, table)
    del midus_step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cost_section(args, table)
    lookup_section(args, bandwidth, table)
    text = f"{name}, {time.perf_counter() - started:.0f} s\n\n" + table.markdown()
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
