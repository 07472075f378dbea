"""Small-model speed: the kit's training step against minimal single-file GPT and Llama loops.

What it measures
    Milliseconds per training step at one shape (by default benchmarks/shakespeare_char.yaml:
    char-level tiny Shakespeare, 4 layers x 128, 4 heads, block 64, batch 12), the arms below in
    one process, alternating (kit, kit-model, minimal, minimal-llama, kit, ...) ``--repeats``
    times, so background load hits all alike:

    * ``kit``: ``python -m midus fit --config <yaml>`` as a user runs it: `MidusCLI` builds the
      Trainer, callbacks, logger, progress bar, DataModule and `CausalLM` from the YAML and
      ``Trainer.fit`` trains; only the run directory (a temporary one), the step count and
      the validation schedule (none inside the timed window) are overridden.
    * ``kit-model``: the same `MidusLM` and optimizer (`CausalLM.optimizer_and_schedule`) in a
      plain loop (forward, loss, backward, clip 1.0, step, schedule), on the same kind of batches:
      the model's own cost, without Lightning.
    * ``minimal-llama``: the kit model's architecture (RMSNorm, rotate-half RoPE, SwiGLU of the
      same hidden width, SDPA) written out plainly, in the same plain loop: what the Llama
      architecture itself costs against ``minimal`` in eager PyTorch.
    * ``kit-compiled`` (with ``--compile``): ``kit`` with ``model.compute.compile=true``.
    * ``minimal``: a nanoGPT-style GPT (benchmarks/minimal_models.py: learned positions, LayerNorm,
      fused q/k/v, GELU MLP 4·d, tied embeddings) of the same width, depth, heads, block, batch and
      vocabulary, in the same plain loop with PyTorch's default AdamW, on random windows of the
      same tokens: the kit's training blocks as one stream (nanoGPT's get_batch).
    * ``+rmsnorm``, ``+rope``, ``+swiglu`` (with ``--components``): ``minimal`` with one part of the
      Llama architecture in nanoGPT's place (RMSNorm for LayerNorm; rotary embeddings for learned
      positions; SwiGLU of the kit's width for GELU 4·d), in the same loop: what each part costs.

    Timing: the first ``--warmup`` steps are excluded; each later step period is timed (for ``kit``
    from one batch end to the next, everything Lightning does between two steps included). An
    arm's figure is its median step over all runs, the ratios are of medians; beside them the best
    runs' ratio, and the ratio of the two arms' runs within each repeat (median, lowest-highest).
    ``kit / minimal`` is the number the kit aims to keep at or below 1.1.

How to run
    python benchmarks/small_model_speed.py                       # the tiny Shakespeare shape
    python benchmarks/small_model_speed.py --steps 100 --repeats 8
    python benchmarks/small_model_speed.py --compile             # + the kit with model.compute.compile=true
    python benchmarks/small_model_speed.py --components          # + nanoGPT with one Llama part each
    python benchmarks/small_model_speed.py --text path/to/tinyshakespeare.txt
    python benchmarks/small_model_speed.py --set trainer.enable_progress_bar=false   # what the bar costs
    python benchmarks/small_model_speed.py --set trainer.profiler=SimpleProfiler --set trainer.profiler.filename=profile
        # Lightning's per-hook times: each kit run's fit-profile.txt under the printed scratch folder
    python benchmarks/small_model_speed.py --config experiments/quickstart.yaml       # any single-run YAML

Numbers compare only within one run of this script; it is a benchmark, never run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/minimal_models.py

from minimal_models import MinimalGPT, MinimalLlama  # noqa: E402

from midus.host_allocator import keep_freed_memory  # noqa: E402
from midus.model.transformer import next_token_loss  # noqa: E402
from midus.training.cli import MidusCLI, cli_kwargs  # noqa: E402


def build_cli(args: argparse.Namespace, run_dir: str, max_steps: int, *extra: str) -> MidusCLI:
    overrides = [
        f"--trainer.max_steps={max_steps}",
        f"--trainer.val_check_interval={max_steps + 1}",  # no validation inside the window
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        f"--trainer.default_root_dir={run_dir}",
    ]
    if args.text:
        overrides.append(f"--data.files.train=[{args.text}]")
    overrides += [f"--{setting}" for setting in args.set] + list(extra)
    return MidusCLI(args=["--config", args.config, *overrides], run=False, **cli_kwargs())


class StepTimes(pl.Callback):
    """The wall time of every step period after the first `warmup` steps (batch end to batch end)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup - 1:
            self.ends.append(time.perf_counter())

    def milliseconds(self) -> list[float]:
        return [1000 * (later - earlier) for earlier, later in zip(self.ends, self.ends[1:])]


def run_kit(args: argparse.Namespace, run_dir: str, *extra: str) -> list[float]:
    cli = build_cli(args, run_dir, args.warmup + args.steps, *extra)
    cli.before_fit()  # what `fit` adds (the run summary), as the subcommand would
    timer = StepTimes(args.warmup)
    cli.trainer.callbacks.append(timer)
    # The progress bar still renders every step (its cost counts), into the run's log.
    with open(Path(run_dir) / "fit.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.milliseconds()


def plain_loop(model: nn.Module, optimizer, schedule, next_batch, args: argparse.Namespace) -> list[float]:
    """Milliseconds of each step after the warmup: batch, forward, loss, backward, clip, step, schedule."""
    ends = []
    for step in range(args.warmup + args.steps):
        ids = next_batch()
        loss = next_token_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup - 1:
            ends.append(time.perf_counter())
    return [1000 * (later - earlier) for earlier, later in zip(ends, ends[1:])]


def random_windows(tokens: torch.Tensor, batch: int, block: int, generator: torch.Generator):
    """nanoGPT's get_batch: `batch` random windows of block + 1 tokens."""
    def next_batch() -> torch.Tensor:
        starts = torch.randint(len(tokens) - block - 1, (batch,), generator=generator)
        return torch.stack([tokens[start : start + block + 1] for start in starts.tolist()])
    return next_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "benchmarks" / "shakespeare_char.yaml"))
    parser.add_argument("--text", default="", help="the training text (default: the config's data.files.train)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both kit arms, e.g. trainer.enable_progress_bar=false")
    parser.add_argument("--compile", action="store_true",
                        help="add the arm kit-compiled: the kit with model.compute.compile=true "
                             "(compiles in the warmup)")
    parser.add_argument("--components", action="store_true",
                        help="add the arms +rmsnorm, +rope, +swiglu: nanoGPT with one Llama part each")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (>= 1)")
    parser.add_argument("--repeats", type=int, default=6, help="alternating runs per arm")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    # As `python -m midus` does, for every arm alike (a process-wide setting).
    kept = keep_freed_memory()

    scratch = tempfile.mkdtemp(prefix="small_model_speed-")
    probe = build_cli(args, scratch, 1)  # reads the YAML: shapes, text, tokenizer
    config, data = probe.model.model.config, probe.datamodule.settings
    block, batch = data["block_size"], data["batch_size"]
    # The kit's own training tokens, as one stream: any config works (the embedded corpus too).
    tokens = torch.stack([block["input_ids"] for block in probe.datamodule.train_blocks]).flatten()
    vocab = config.vocab_size
    generator = torch.Generator().manual_seed(0)
    windows = random_windows(tokens, batch, block, generator)
    minimal_parameters = sum(p.numel() for p in MinimalGPT(vocab, config.d_model, config.depth, config.n_heads,
                                                             block).parameters())
    llama_parameters = sum(p.numel() for p in MinimalLlama(vocab, config.d_model, config.depth, config.n_heads,
                                                             config.ffn_width, block).parameters())

    print("small-model speed: the kit's step against a minimal GPT loop (comparable only within this run)")
    print(f"torch {torch.__version__}, lightning {pl.__version__}, python {platform.python_version()}, "
          f"{torch.get_num_threads()} threads, cpu_count {os.cpu_count()}")
    print(f"config {args.config}: d {config.d_model}, layers {config.depth}, heads {config.n_heads}/"
          f"{config.kv_heads} kv, ffn {config.ffn_width}, vocab {vocab}, block {block}, batch {batch}")
    print(f"parameters: kit {probe.model.model.num_parameters():,}, minimal {minimal_parameters:,}, "
          f"minimal-llama {llama_parameters:,}")
    print(f"{args.warmup} warmup + {args.steps} timed steps per run, {args.repeats} repeats, arms alternating; "
          f"freed memory kept in the process (midus.host_allocator) for every arm: {kept}")
    print(f"run folders (logs, fit.log): {scratch}\n")

    def kit() -> list[float]:
        return run_kit(args, tempfile.mkdtemp(dir=scratch))

    def kit_model() -> list[float]:
        cli = build_cli(args, tempfile.mkdtemp(dir=scratch), args.warmup + args.steps)
        setup = cli.model.optimizer_and_schedule(args.warmup + args.steps)
        cli.model.model.train()
        return plain_loop(cli.model.model, setup["optimizer"], setup["lr_scheduler"]["scheduler"], windows, args)

    def minimal() -> list[float]:
        torch.manual_seed(0)
        model = MinimalGPT(vocab, config.d_model, config.depth, config.n_heads, block)
        return plain_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, windows, args)

    def minimal_llama() -> list[float]:
        torch.manual_seed(0)
        model = MinimalLlama(vocab, config.d_model, config.depth, config.n_heads, config.ffn_width, block)
        return plain_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, windows, args)

    def minimal_with(**part) -> list[float]:
        torch.manual_seed(0)
        model = MinimalGPT(vocab, config.d_model, config.depth, config.n_heads, block, **part)
        return plain_loop(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, windows, args)

    arms = {"kit": kit, "kit-model": kit_model, "minimal": minimal, "minimal-llama": minimal_llama}
    if args.compile:
        arms["kit-compiled"] = lambda: run_kit(args, tempfile.mkdtemp(dir=scratch), "--model.compute.compile=true")
    components = {
        "+rmsnorm": dict(norm="rms"),
        "+rope": dict(positions="rope"),
        "+swiglu": dict(mlp="swiglu", hidden=config.ffn_width),
    } if args.components else {}
    for name, part in components.items():
        arms[name] = lambda part=part: minimal_with(**part)
    steps: dict[str, list[float]] = {name: [] for name in arms}  # every timed step of every run
    run_means: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name, arm in arms.items():
            times = arm()
            steps[name] += times
            run_means[name].append(statistics.mean(times))
            print(f"run {repeat} {name:<14} mean {run_means[name][-1]:7.2f}  median {statistics.median(times):7.2f} "
                  "ms/step", flush=True)
    # The median step over all runs: runs alternate, so a slow spell of the machine hits every arm
    # alike, and the median ignores the steps it stretched; the best run's mean is printed beside it.
    median = {name: statistics.median(values) for name, values in steps.items()}
    print(f"\n{'arm':<14} {'median ms/step':>14} {'best run mean':>14} {'steps/s':>8}")
    for name in arms:
        print(f"{name:<14} {median[name]:14.2f} {min(run_means[name]):14.2f} {1000 / median[name]:8.1f}")

    def ratio(a: str, b: str, what: str) -> None:
        # Runs of one repeat follow each other within seconds: their ratios see the same machine, and
        # their spread over the repeats shows how far one run's ratio can be trusted.
        paired = sorted(x / y for x, y in zip(run_means[a], run_means[b]))
        print(f"{a + ' / ' + b + ':':<28} {median[a] / median[b]:.3f}  (best runs: "
              f"{min(run_means[a]) / min(run_means[b]):.3f}; per repeat: median {statistics.median(paired):.3f}, "
              f"{paired[0]:.3f}-{paired[-1]:.3f})  {what}")

    print()
    ratio("kit", "minimal", "target <= 1.1")
    if "kit-compiled" in arms:
        ratio("kit-compiled", "minimal", "model.compute.compile=true")
    ratio("kit", "minimal-llama", "the kit against a plain loop of its own architecture")
    ratio("kit-model", "minimal-llama", "the kit's model code against plain code")
    ratio("kit", "kit-model", "the Lightning layer's share")
    ratio("minimal-llama", "minimal", "the Llama architecture's cost in eager PyTorch")
    for name in components:
        ratio(name, "minimal", f"nanoGPT with {name[1:]}: that part's cost")

if __name__ == "__main__":
    main()
