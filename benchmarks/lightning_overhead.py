"""Lightning overhead benchmark: `CausalLM` under `Trainer.fit` against a bare PyTorch loop.

What it measures
    Training throughput (tokens/s, ms/step) and peak memory of the kit's FFN model
    (`midus.model.MidusLM` built from a `ModelConfig`) trained two ways, in one process:

    * ``lightning``: `lightning.pytorch.Trainer.fit` on `midus.training.CausalLM`, i.e. the
      real training step of the kit, with its per-step ``self.log`` calls and throughput
      bookkeeping, automatic optimization and gradient clipping (``gradient_clip_val=1.0``).
    * ``bare``: a plain loop over a `MidusLM` of the same config and the same initial weights:
      zero_grad → forward + the same cross-entropy loss → backward → clip_grad_norm_(1.0) →
      AdamW step → schedule step, with the optimizer and schedule the Lightning arm's module
      builds (`CausalLM.optimizer_and_schedule`).

    Both arms train on exactly the same pre-generated random token batches, already on the
    device, so data loading costs nothing in either arm. Each arm runs eager and compiled
    (``CausalLM(compute=ComputeConfig(compile=True))`` calls ``self.model.compile()`` in
    ``configure_model``; the bare loop calls ``model.compile()`` the same way). The ratio lightning/bare tokens/s is the
    Lightning overhead (1.0 = none); compiled/eager is the torch.compile speed-up of each arm.

    Timing: the first ``--warmup`` steps (allocation, compilation, autotuning) are excluded.
    The timed window runs from the end of the last warmup step to the end of the last step,
    so it holds exactly ``--steps`` full step periods, everything Lightning does between two
    steps included (hooks, logging, batch fetching, the scheduler step). On CUDA the device
    is synchronised at both ends. Lightning and bare runs alternate ``--repeats`` times
    (L, B, L, B, ...) and the best run of each arm is reported, so background load hits both
    arms alike. The loss of the last step is printed for every run: with the same weights,
    batches and optimizer the arms should agree (exactly or nearly so in fp32 eager), which
    checks that both did the same work.

    Peak memory: on CUDA, `torch.cuda.max_memory_allocated` with the peak reset before each
    run (weights, optimizer state, activations and the shared batches). On CPU there is no
    per-arm allocator peak; the script reports the process peak RSS (``ru_maxrss``) after the
    run and how much the run raised it. That peak is cumulative over the whole process (the
    first run also pays for imports and allocator growth, later runs show growth only where
    they exceed every earlier run), so it is only an upper bound, not a per-arm figure.

How to run
    python benchmarks/lightning_overhead.py                      # cuda if available, else cpu
    python benchmarks/lightning_overhead.py --device cuda --precision bf16-mixed \\
        --d-model 512 --layers 8 --heads 8 --kv-heads 4 --block-size 512 --batch-size 32
    python benchmarks/lightning_overhead.py --device cpu --d-model 128 --layers 4 --heads 4 \\
        --kv-heads 2 --block-size 128 --batch-size 16 --steps 30 --warmup 5   # small CPU run
    python benchmarks/lightning_overhead.py --no-compile          # eager arms only

Numbers are only comparable within one run of this script (same process, same machine,
same load); it is a benchmark, not a test, and is never run in CI.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from midus.model import MidusLM, ModelConfig  # noqa: E402
from midus.model.transformer import next_token_loss  # noqa: E402
from midus.training.config import ComputeConfig  # noqa: E402
from midus.training.lm_module import CausalLM  # noqa: E402

SEED = 0


@dataclass
class RunResult:
    arm: str
    repeat: int
    seconds: float
    steps: int
    tokens_per_step: int
    peak_bytes: int  # cuda: max_memory_allocated; cpu: ru_maxrss after the run (process, cumulative)
    rss_growth_bytes: int  # cpu only: how much the run raised the process peak RSS
    last_loss: float

    @property
    def tokens_per_sec(self) -> float:
        return self.steps * self.tokens_per_step / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.seconds / self.steps


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        branch="ffn",
    )


def make_batches(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    total = args.warmup + args.steps
    return [
        torch.randint(0, args.vocab_size, (args.batch_size, args.block_size + 1), generator=generator).to(device)
        for _ in range(total)
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def clean_slate(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if compiled:
        # Every compiled run starts from the same Dynamo state (on-disk Inductor caches stay).
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss_bytes()


class StepTimer(pl.Callback):
    """Times the step periods after warmup and keeps the loss of the last step."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.last = warmup, warmup + steps - 1
        self.device = device
        self.started = self.stopped = None
        self.last_loss: torch.Tensor | None = None
        self.estimated_steps = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.estimated_steps = trainer.estimated_stepping_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Callback hooks run before the module's own on_train_batch_end, so the window from the
        # end of step warmup-1 to the end of the last step holds `steps` complete periods.
        if batch_idx == self.warmup - 1:
            synchronize(self.device)
            self.started = time.perf_counter()
        elif batch_idx == self.last:
            synchronize(self.device)
            self.stopped = time.perf_counter()
            self.last_loss = outputs["loss"].detach()


def run_lightning(args, batches, device, compiled: bool, repeat: int) -> RunResult:
    clean_slate(device, compiled)
    rss_before = max_rss_bytes()
    torch.manual_seed(SEED)
    module = CausalLM(model_config(args), compute=ComputeConfig(compile=compiled))
    loader = DataLoader([{"input_ids": batch} for batch in batches], batch_size=None, shuffle=False)
    timer = StepTimer(args.warmup, args.steps, device)
    trainer = pl.Trainer(
        accelerator="cuda" if device.type == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=len(batches),
        max_epochs=1,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    if timer.started is None or timer.stopped is None:
        raise RuntimeError(f"Lightning ran {trainer.global_step} steps, expected {len(batches)}")
    if timer.estimated_steps != len(batches):
        raise RuntimeError(
            f"Lightning scheduled {timer.estimated_steps} steps for the LR schedule, the bare loop {len(batches)}"
        )
    result = RunResult(
        arm="lightning-compiled" if compiled else "lightning-eager",
        repeat=repeat,
        seconds=timer.stopped - timer.started,
        steps=args.steps,
        tokens_per_step=args.batch_size * args.block_size,
        peak_bytes=peak_bytes(device),
        rss_growth_bytes=max_rss_bytes() - rss_before,
        last_loss=float(timer.last_loss),
    )
    del module, trainer, loader, timer
    return result


def run_bare(args, batches, device, compiled: bool, repeat: int) -> RunResult:
    clean_slate(device, compiled)
    rss_before = max_rss_bytes()
    torch.manual_seed(SEED)
    # The same module as the Lightning arm (so the same initial weights) and its own optimizer and
    # schedule, taken out of the LightningModule.
    module = CausalLM(model_config(args))
    model = module.model.to(device)
    model.train()
    if compiled:
        model.compile()
    setup = module.optimizer_and_schedule(len(batches))
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    use_autocast = args.precision == "bf16-mixed"
    started = 0.0
    loss = torch.zeros(())
    for index, batch in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            # The loss of CausalLM._loss.
            loss = next_token_loss(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if index == args.warmup - 1:
            synchronize(device)
            started = time.perf_counter()
    synchronize(device)
    stopped = time.perf_counter()
    result = RunResult(
        arm="bare-compiled" if compiled else "bare-eager",
        repeat=repeat,
        seconds=stopped - started,
        steps=args.steps,
        tokens_per_step=args.batch_size * args.block_size,
        peak_bytes=peak_bytes(device),
        rss_growth_bytes=max_rss_bytes() - rss_before,
        last_loss=float(loss.detach()),
    )
    del module, model, optimizer, schedule, loss
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mib(n: int) -> float:
    return n / 2**20


def print_table(results: list[RunResult], device: torch.device, arms: list[str]) -> dict[str, RunResult]:
    best: dict[str, RunResult] = {}
    first: dict[str, RunResult] = {}
    worst: dict[str, RunResult] = {}
    for result in results:
        first.setdefault(result.arm, result)
        if result.arm not in best or result.tokens_per_sec > best[result.arm].tokens_per_sec:
            best[result.arm] = result
        if result.arm not in worst or result.tokens_per_sec < worst[result.arm].tokens_per_sec:
            worst[result.arm] = result
    if device.type == "cuda":
        memory_header = "peak allocated MiB"
    else:
        memory_header = "process peak RSS MiB (cumulative; upper bound) / +growth in 1st run"
    print()
    print(f"best of {max(r.repeat for r in results) + 1} run(s) per arm; spread = 1 - worst/best tokens/s")
    print(f"{'arm':<20} {'tokens/s':>11} {'ms/step':>9} {'spread':>7} {'last loss':>10}  {memory_header}")
    noisy = False
    for arm in arms:
        if arm not in best:
            continue
        r = best[arm]
        spread = 1.0 - worst[arm].tokens_per_sec / r.tokens_per_sec
        noisy |= spread > 0.1
        if device.type == "cuda":
            memory = f"{mib(max(x.peak_bytes for x in results if x.arm == arm)):.1f}"
        else:
            f = first[arm]
            memory = f"{mib(f.peak_bytes):.1f} / +{mib(f.rss_growth_bytes):.1f}"
        print(
            f"{arm:<20} {r.tokens_per_sec:>11.0f} {r.ms_per_step:>9.2f} {spread:>7.1%} {r.last_loss:>10.4f}  {memory}"
        )
    if noisy:
        print("warning: runs of one arm differ by more than 10%: the machine was probably busy; rerun, raise --repeats")
    return best


def print_ratios(best: dict[str, RunResult]) -> None:
    def ratio(a: str, b: str) -> str:
        if a in best and b in best:
            return f"{best[a].tokens_per_sec / best[b].tokens_per_sec:.3f}"
        return "n/a"

    print()
    print("ratios of best tokens/s")
    print(f"  lightning / bare, eager:      {ratio('lightning-eager', 'bare-eager')}   (1.0 = no Lightning overhead)")
    if "lightning-compiled" in best:
        print(f"  lightning / bare, compiled:   {ratio('lightning-compiled', 'bare-compiled')}")
        speedup = ratio("lightning-compiled", "lightning-eager")
        print(f"  compiled / eager, lightning:  {speedup}   (>1 = compile helps)")
        print(f"  compiled / eager, bare:       {ratio('bare-compiled', 'bare-eager')}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--vocab-size", type=int, default=2048,
                        help="vocabulary size (65 is a char-level tiny-Shakespeare model)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before the timed ones (>= 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile arms")
    parser.add_argument("--repeats", type=int, default=2, help="alternating Lightning/bare runs per arm")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step allocates, and compiles when compiling)")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    # Keep the output to the benchmark: Lightning's info lines, its hints about data loader
    # workers and logging intervals, and its note that the val loop is skipped (on purpose).
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")

    config = model_config(args)
    parameters = MidusLM(config).num_parameters()
    print("Lightning overhead benchmark (numbers comparable only within this run)")
    print(f"device: {device} ({device_name(device)})")
    print(f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}")
    print(
        f"threads: torch {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op; "
        f"cpu_count {os.cpu_count()}"
    )
    print(
        f"model: MidusLM ffn, d_model {config.d_model}, layers {config.depth}, heads {config.n_heads}/"
        f"{config.kv_heads} kv, ffn_hidden {config.ffn_width}, vocab {args.vocab_size}: {parameters:,} parameters"
    )
    print(
        f"data: {args.warmup} warmup + {args.steps} timed steps of {args.batch_size} x {args.block_size} tokens, "
        f"precision {args.precision}, repeats {args.repeats}, compile {'no' if args.no_compile else 'yes'}"
    )
    print("optimizer (both arms): CausalLM.optimizer_and_schedule with CausalLM's defaults, grad clip 1.0")
    print()

    batches = make_batches(args, device)
    results: list[RunResult] = []
    modes = [False] if args.no_compile else [False, True]
    for compiled in modes:
        for repeat in range(args.repeats):
            for runner in (run_lightning, run_bare):
                wall = time.perf_counter()
                result = runner(args, batches, device, compiled, repeat)
                results.append(result)
                print(
                    f"run {result.arm:<19} #{repeat}: {result.tokens_per_sec:>9.0f} tokens/s, "
                    f"{result.ms_per_step:8.2f} ms/step, last loss {result.last_loss:.4f} "
                    f"(whole run incl. warmup {time.perf_counter() - wall:.1f} s)",
                    flush=True,
                )

    arms = ["lightning-eager", "bare-eager", "lightning-compiled", "bare-compiled"]
    best = print_table(results, device, arms)
    print_ratios(best)


if __name__ == "__main__":
    main()
