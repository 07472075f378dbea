"""How the cost of memory blocks scales against the Transformer block they replace.

Arms, each one block built by the kit: ``transformer`` (attention + SwiGLU FFN) against the
memory blocks ``hml-hive``, ``hml-per_head``, ``pkm`` (one query of width d) and
``multihead_pkm`` (``--pkm_heads`` queries of width d), all at equal width. Widths are
Llama-like: heads of 64, n_kv_heads = n_heads / 4 (at least 1), the kit's FFN rule (8/3 · d
rounded up to 64). Three costs per arm: a training step (forward + backward of a loss on the
block output), a prefill (forward of T tokens into a KV cache, no grad) and one decode step
(one token per sequence after T cached positions, no grad).

One axis is swept at a time around a base point, the others held there:

    full:    d 512, T 512, B 8, n 128 (16384 slots), k 32, latent 64
             d 128…2048, T 128…4096, B 1…64, n 32…512, k 8…64, latent 16…256
    --quick: d 256, T 256, B 2, n 64, k 16, latent 32 (a smoke run: 4 points per axis, 2 repeats)
             d 128…1024, T 128…1024, B 1…8, n 32…256, k 8…64, latent 16…128

The latent axis times only ``transformer`` and ``hml-hive`` (nothing else reads the latent width).
Arms alternate within one process (A, B, C, A, B, C, ...) so background load hits every arm
alike; the best of ``--repeats`` rounds counts (decode steps get 5× the rounds).

Printed: for each axis a table of memory block time / Transformer block time per step, with
the cost model's roofline ratio for this machine in parentheses (its matmul and vector rates
and bandwidth calibrated at start-up), and where the measured ratio crosses 1.0; the cost model
(`midus.analysis.cost_model`) per part at the base point next to the measured times; and a
roofline prediction for an H100 at a Llama-3.2-1B-sized block. Plots: ``ratio_vs_<axis>.png``
in ``--out_dir``, with ``report.md`` (the printed text) and ``results.json``.

    python benchmarks/cost_scaling.py --quick --threads 2       # smoke run: 40 s on 2 busy cores
    python benchmarks/cost_scaling.py --threads 2               # full sweep: about an hour on 2 cores
    python benchmarks/cost_scaling.py --device cuda --dtype bfloat16
    python benchmarks/cost_scaling.py --axes tokens batch --repeats 5

Numbers compare only within one run of this script; it is never run in CI. On a shared CPU they
move by tens of percent from point to point: the Transformer block is the same block all along
the n, k and latent axes, so its column there shows the noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

# Idle OpenMP threads sleep instead of spinning (set before torch loads its OpenMP runtime): on
# cores shared with other jobs, two spinning threads made a 256K-element multiply 100x slower.
# Export OMP_WAIT_POLICY=ACTIVE on a machine of your own.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py

from timing import best_times_ms  # noqa: E402

from midus.analysis import cost_model as cm  # noqa: E402
from midus.model import LayerSpec, ModelConfig  # noqa: E402
from midus.model.block import TransformerBlock  # noqa: E402
from midus.model.kv_cache import KVCache  # noqa: E402
from midus.model.memory_block import MemoryBlock  # noqa: E402
from midus.model.rotary import RotaryEmbedding  # noqa: E402

ARMS = {  # arm (= cost-model block kind) -> block kind, branch, HML value layout
    "transformer": ("transformer", "ffn", "hive"),
    "hml-hive": ("memory", "hml", "hive"),
    "hml-per_head": ("memory", "hml", "per_head"),
    "pkm": ("memory", "pkm", "hive"),
    "multihead_pkm": ("memory", "multihead_pkm", "hive"),
}
MEMORY_ARMS = [arm for arm in ARMS if arm != "transformer"]
STEPS = ("train", "prefill", "decode")
HEAD_DIM = 64


@dataclass(frozen=True)
class Point:
    """One benchmark point: width, tokens per sequence (also the decode context), batch, n, k, latent."""

    d_model: int
    tokens: int
    batch: int
    n_subkeys: int
    topk: int
    latent_dim: int


FULL_BASE = Point(512, 512, 8, 128, 32, 64)
QUICK_BASE = Point(256, 256, 2, 64, 16, 32)
FULL_AXES = {"d_model": [128, 256, 512, 1024, 2048], "tokens": [128, 256, 512, 1024, 2048, 4096],
             "batch": [1, 2, 4, 8, 16, 32, 64], "n_subkeys": [32, 64, 128, 256, 512], "topk": [8, 16, 32, 64],
             "latent_dim": [16, 32, 64, 128, 256]}
QUICK_AXES = {"d_model": [128, 256, 512, 1024], "tokens": [128, 256, 512, 1024], "batch": [1, 2, 4, 8],
              "n_subkeys": [32, 64, 128, 256], "topk": [8, 16, 32, 64], "latent_dim": [16, 32, 64, 128]}


def block_config(point: Point, arm: str, pkm_heads: int, d_ffn: int = 0, heads: int = 0, kv: int = 0) -> ModelConfig:
    """One-block config of `arm` at `point`: heads of 64, n_heads / 4 KV heads (at least 1), the kit's FFN rule."""
    block, branch, values = ARMS[arm]
    heads = heads or max(1, point.d_model // HEAD_DIM)
    return ModelConfig(
        vocab_size=8, d_model=point.d_model, n_heads=heads, n_kv_heads=kv or max(1, heads // 4), ffn_hidden=d_ffn,
        layers=[LayerSpec(block, branch)],
        memory={"n_subkeys": point.n_subkeys, "topk": point.topk, "latent_dim": point.latent_dim, "values": values,
                "zero_init_values": False, "pkm_heads": pkm_heads},
    )


def measure_point(point: Point, arms: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """step -> arm -> best ms at `point`: training step, prefill of T tokens, one decode step after T."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    configs = {arm: block_config(point, arm, args.pkm_heads) for arm in arms}
    blocks = {arm: (TransformerBlock if ARMS[arm][0] == "transformer" else MemoryBlock)(config, 0)
              for arm, config in configs.items()}
    blocks = {arm: block.to(device=device, dtype=dtype) for arm, block in blocks.items()}
    config = configs[arms[0]]
    rotary = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    x = torch.randn(point.batch, point.tokens, point.d_model, device=device, dtype=dtype)
    token = torch.randn(point.batch, 1, point.d_model, device=device, dtype=dtype)
    rope = rotary(torch.arange(point.tokens, device=device), dtype)
    step_rope = rotary(torch.arange(point.tokens, point.tokens + 1, device=device), dtype)
    caches = {arm: KVCache(1, point.batch, point.tokens + 1, config.kv_heads, config.head_dim, device, dtype)
              for arm in arms}

    def train(arm: str) -> Callable[[], None]:
        def run() -> None:
            blocks[arm].zero_grad(set_to_none=True)
            blocks[arm](x, rope).float().square().mean().backward()
        return run

    @torch.no_grad()
    def prefill(arm: str) -> None:
        blocks[arm](x, rope, caches[arm], 0)

    @torch.no_grad()
    def decode(arm: str) -> None:
        blocks[arm](token, step_rope, caches[arm], point.tokens)

    times = {"train": best_times_ms({arm: train(arm) for arm in arms}, args.repeats, device)}
    times["prefill"] = best_times_ms({arm: (lambda a=arm: prefill(a)) for arm in arms}, args.repeats, device)
    # The prefill filled every cache, so each decode step reads T real cached positions.
    times["decode"] = best_times_ms({arm: (lambda a=arm: decode(a)) for arm in arms}, 5 * args.repeats, device)
    return times


def workloads(point: Point) -> dict[str, cm.Workload]:
    return {"train": cm.Workload(point.batch, point.tokens), "prefill": cm.Workload(point.batch, point.tokens, 0, True),
            "decode": cm.Workload(point.batch, 1, point.tokens, True)}


def calibrate(device: torch.device, dtype: torch.dtype) -> cm.Device:
    """This machine's matmul FLOP/s (a 1024² product), vector FLOP/s (multiplies in place) and copy bandwidth."""
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    small = torch.randn(1 << 20, device=device, dtype=dtype)
    source, target = torch.randn(1 << 24, device=device, dtype=dtype), torch.empty(1 << 24, device=device, dtype=dtype)
    ms = best_times_ms({"matmul": lambda: a @ a, "vector": lambda: [small.mul_(1.0) for _ in range(10)],
                        "copy": lambda: target.copy_(source)}, 7, device)
    matmul, vector = 2 * 1024**3 / ms["matmul"] * 1e3, 10 * small.numel() / ms["vector"] * 1e3
    bandwidth = 2 * source.numel() * source.element_size() / ms["copy"] * 1e3
    name = f"this machine, calibrated: {matmul / 1e9:.0f} GFLOP/s matmul, {vector / 1e9:.1f} GFLOP/s vector, " \
           f"{bandwidth / 1e9:.1f} GB/s copy"
    return cm.Device(name, matmul, vector, bandwidth)


def crossovers(values: list[int], ratios: list[float]) -> list[float]:
    """Axis values where the ratio crosses 1.0, interpolated linearly in log(value) and log(ratio)."""
    found = []
    for (x0, r0), (x1, r1) in zip(zip(values, ratios), zip(values[1:], ratios[1:])):
        if (r0 - 1.0) * (r1 - 1.0) < 0:
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            found.append(math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0))))
    return found


def si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


class Report:
    """Prints lines and keeps them for report.md."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def sweep_axis(axis: str, values: list[int], base: Point, args, machine: cm.Device, cache: dict, out: Report) -> dict:
    """Measure (or reuse) every point of `axis`, print its table and crossovers; returns the numbers."""
    arms = ["transformer", "hml-hive"] if axis == "latent_dim" else list(ARMS)
    element_bytes = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    measured, predicted = {}, {}
    for value in values:
        point = replace(base, **{axis: value})
        if point not in cache:
            cache[point] = measure_point(point, list(ARMS) if point == base else arms, args)
            gc.collect()  # the point's blocks and caches, before the next point allocates its own
        measured[value] = cache[point]
        sizes = cm.BlockSizes.from_config(block_config(point, "transformer", args.pkm_heads))
        predicted[value] = {step: {arm: cm.roofline_seconds(cm.block_parts(arm, sizes, work, element_bytes), machine,
                                                            backward=step == "train") for arm in arms}
                            for step, work in workloads(point).items()}
    others = ", ".join(f"{k} {v}" for k, v in asdict(base).items() if k != axis)
    out(f"\n## {axis} (others at {others}): memory block time / Transformer block time, measured (roofline)")
    memory_arms = [arm for arm in arms if arm != "transformer"]
    out(f"| {axis} | step | transformer ms | " + " | ".join(memory_arms) + " |")
    out("|---" * (3 + len(memory_arms)) + "|")
    for value in values:
        for step in STEPS:
            ms, pred = measured[value][step], predicted[value][step]
            cells = [f"{ms[a] / ms['transformer']:.2f} ({pred[a] / pred['transformer']:.2f})" for a in memory_arms]
            out(f"| {value} | {step} | {ms['transformer']:.2f} | " + " | ".join(cells) + " |")
    crossings = []
    for step in STEPS:
        for arm in memory_arms:
            ratios = [measured[v][step][arm] / measured[v][step]["transformer"] for v in values]
            crossings += [f"{arm} {step} at {axis} ≈ {x:.0f}" for x in crossovers(values, ratios)]
    out("measured ratio crosses 1.0: " + ("; ".join(crossings) or f"nowhere in {values[0]}…{values[-1]}"))
    return {"values": values, "arms": arms, "measured": measured, "predicted": predicted}


def plot_axis(axis: str, result: dict, path: Path, title: str) -> None:
    """Ratio against `axis` per step: measured (solid), roofline (dashed), crossovers of 1.0 marked."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    values, colors = result["values"], dict(zip(MEMORY_ARMS, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    fig = Figure(figsize=(13, 4.2), dpi=110, layout="constrained")
    panels = fig.subplots(1, 3, sharey=True)
    for panel, step in zip(panels, STEPS):
        for arm in (a for a in result["arms"] if a != "transformer"):
            ratios = [result["measured"][v][step][arm] / result["measured"][v][step]["transformer"] for v in values]
            roofline = [result["predicted"][v][step][arm] / result["predicted"][v][step]["transformer"] for v in values]
            panel.plot(values, ratios, "o-", color=colors[arm], label=f"{arm} measured")
            panel.plot(values, roofline, "--", color=colors[arm], alpha=0.5, label=f"{arm} roofline")
            for x in crossovers(values, ratios):
                panel.plot([x], [1.0], "X", ms=11, color=colors[arm], mec="black")
                panel.annotate(f"{x:.0f}", (x, 1.0), textcoords="offset points", xytext=(4, 6), fontsize=8,
                               color=colors[arm])
        panel.axhline(1.0, color="black", lw=0.8)
        panel.set_xscale("log", base=2)
        panel.set_yscale("log")
        panel.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        panel.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        panel.set_xticks(values, [str(v) for v in values])
        panel.xaxis.set_minor_locator(NullLocator())
        panel.grid(alpha=0.3, which="both")
        panel.set_title(step)
        panel.set_xlabel(axis)
    panels[0].set_ylabel("memory block time / Transformer block time")
    panels[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path)


def print_cost_model(base: Point, times: dict, args, machine: cm.Device, out: Report) -> None:
    """Per part and per token: FLOPs, bytes and FLOP/byte of each step, then measured and roofline times."""
    element_bytes = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    out(f"\n## cost model at the base point ({', '.join(f'{k} {v}' for k, v in asdict(base).items())}), per token")
    for arm in ARMS:
        sizes = cm.BlockSizes.from_config(block_config(base, arm, args.pkm_heads))
        parts = {step: cm.block_parts(arm, sizes, work, element_bytes) for step, work in workloads(base).items()}
        costs = {step: cm.step_costs(parts[step], backward=step == "train") for step in STEPS}
        out(f"\n### {arm}")
        out("| part | " + " | ".join(f"{s} FLOP/tok | {s} B/tok | {s} FLOP/B" for s in STEPS) + " |")
        out("|---" * 10 + "|")
        for index, name in enumerate([name for name, _ in costs["train"]] + ["total"]):
            cells = []
            for step, work in workloads(base).items():
                cost = cm.total(costs[step]) if name == "total" else costs[step][index][1]
                cells.append(f"{si(cost.flops / work.rows)} | {si(cost.bytes / work.rows)} | {cost.intensity:.1f}")
            out(f"| {name} | " + " | ".join(cells) + " |")
        summary = [f"{step} {times[step][arm]:.3f} ms measured "
                   f"({cm.total(costs[step]).flops / times[step][arm] / 1e6:.2f} GFLOP/s), "
                   f"{cm.roofline_seconds(parts[step], machine, step == 'train') * 1e3:.3f} ms roofline"
                   for step in STEPS]
        out("measured: " + "; ".join(summary))


def print_h100_prediction(args, out: Report) -> None:
    """Roofline ratio on an H100 in bf16 at a Llama-3.2-1B-sized block, with the largest parts."""
    point = Point(2048, 2048, 1, 256, 32, 64)
    sizes = cm.BlockSizes.from_config(block_config(point, "transformer", args.pkm_heads, d_ffn=8192, heads=32, kv=8))
    cases = [("train", cm.Workload(4, 2048)), ("prefill", cm.Workload(1, 2048, 0, True)),
             ("decode", cm.Workload(1, 1, 2048, True)), ("decode", cm.Workload(64, 1, 2048, True))]
    out(f"\n## PREDICTION, not a measurement: roofline on {cm.H100_SXM.name}; bf16")
    out(f"Llama-3.2-1B-sized block: d 2048, 32 heads of 64, 8 KV heads, FFN 8192; memory n {sizes.n_subkeys} "
        f"({sizes.n_subkeys ** 2} slots), k {sizes.topk}, latent {sizes.latent_dim}, multi-head PKM "
        f"{sizes.pkm_heads} queries of width {sizes.query_dim}. Cells: memory block time / Transformer block time, "
        "HBM only / with gathers from tables that fit in a 50 MB L2 served at 5.5 TB/s (assumed). No launch "
        "latency: decode ratios are lower bounds for blocks of many small kernels.")
    out("| step | workload | transformer µs | " + " | ".join(MEMORY_ARMS) + " |")
    out("|---" * (3 + len(MEMORY_ARMS)) + "|")
    largest = []
    for step, work in cases:
        seconds = {}
        for arm in ARMS:
            parts, train = cm.block_parts(arm, sizes, work, 2), step == "train"
            seconds[arm] = [cm.roofline_seconds(parts, device, train) for device in (cm.H100_SXM, cm.H100_SXM_L2)]
            shares = sorted(((cm.roofline_seconds([p], cm.H100_SXM, train) / seconds[arm][0], p.name) for p in parts),
                            reverse=True)
            largest.append(f"{arm} {step} B{work.batch}: " + ", ".join(f"{n} {s:.0%}" for s, n in shares[:3]))
        label = f"B {work.batch} × T {work.tokens}" if step != "decode" else f"B {work.batch}, context {work.context}"
        cells = [" / ".join(f"{s / t:.2f}" for s, t in zip(seconds[a], seconds["transformer"])) for a in MEMORY_ARMS]
        out(f"| {step} | {label} | {seconds['transformer'][0] * 1e6:.1f} | " + " | ".join(cells) + " |")
    out("largest parts of the predicted time (HBM only):")
    for line in largest:
        out(f"- {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=0, help="alternating timed rounds per arm (0: 3, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="small base point, 3 points per axis, 2 repeats")
    parser.add_argument("--axes", nargs="+", choices=list(FULL_AXES), default=list(FULL_AXES))
    parser.add_argument("--pkm_heads", type=int, default=4, help="query heads of multihead_pkm (Lample et al.: 4)")
    parser.add_argument("--out_dir", type=Path, default=Path("benchmarks/out/cost_scaling"))
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, axes = (QUICK_BASE, QUICK_AXES) if args.quick else (FULL_BASE, FULL_AXES)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = Report()
    out(f"# benchmarks/cost_scaling.py: torch {torch.__version__}, device {device}, {args.dtype}, "
        f"threads {torch.get_num_threads()}, best of {args.repeats} (decode {5 * args.repeats})")
    machine = calibrate(device, dtype)
    out(f"roofline in parentheses: {machine.name}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict[Point, dict] = {}
    results = {}
    for axis in args.axes:
        results[axis] = sweep_axis(axis, axes[axis], base, args, machine, cache, out)
        plot_axis(axis, results[axis], args.out_dir / f"ratio_vs_{axis}.png",
                  f"{axis} sweep around {asdict(base)}; {device}, {args.dtype}\ndashed: roofline, {machine.name}")
    if base not in cache:
        cache[base] = measure_point(base, list(ARMS), args)
    print_cost_model(base, cache[base], args, machine, out)
    print_h100_prediction(args, out)
    (args.out_dir / "report.md").write_text("\n".join(out.lines) + "\n", encoding="utf-8")
    (args.out_dir / "results.json").write_text(json.dumps({"base": asdict(base), "axes": results}, indent=1))
    print(f"\nwrote {args.out_dir}/ratio_vs_*.png, report.md, results.json")


if __name__ == "__main__":
    main()
