"""``python -m midus fixed-retrieval``: fit competing value realisations on recorded, fixed retrieval.

Tests the paper's claim that head-specific values are not a dense FFN residual in disguise.
The protocol is in `DESCRIPTION` (the command's ``--help``); the realisations, the recording
and the substituted blocks are in `midus.analysis.value_realisations`.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from jsonargparse import DefaultHelpFormatter

from midus.analysis.checkpoint_run import analysis_parser, fail_cleanly, load_checkpoint_run
from midus.analysis.figures import new_figure, write_figure
from midus.analysis.value_realisations import (
    REALISATIONS,
    CachedPrefix,
    FixedRetrievalBlock,
    Realisation,
    Recording,
    RetrievalFeed,
    batched,
    build_realisation,
    loss_of,
    mean_loss,
    record,
    token_mean,
    value_parameters,
)
from midus.model.branches.hml import HeadwiseMemory
from midus.model.memory_block import MemoryBlock
from midus.model.transformer import MidusLM

DEFAULT_REALISATIONS = ["hive", "shared", "dense_ffn"]
DEFAULT_LEARNING_RATES = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
TAG = "analysis/fixed_retrieval"

DESCRIPTION = """\
Fixed retrieval: do head-specific values matter, or is the memory a dense FFN residual in disguise?
(The paper's exact protocol is not public; this is the kit's.)

1. Record. The checkpoint's model runs once, frozen, on --train_batches training batches of
   --batch_size blocks (drawn without replacement with --seed) and on the validation split
   (--max_batches batches of --batch_size, 0 = all). A forward hook on the product keys of
   every HML memory block (--blocks; default all) keeps, per token and head, the k slots and
   softmax weights retrieved. The checkpoint's loss on these batches is the 'checkpoint' anchor.
2. Hold fixed. The model stays frozen. In each selected block the memory branch is replaced
   by a realisation fed the RECORDED retrieval of the current batch: the product keys are
   never called again, so slots and weights stay what the trained model chose while the
   values are refitted. Block output = x + realisation. (A later block's input moves with an
   earlier block's realisation; its retrieval does not. Memory blocks left out of --blocks
   keep their trained values and live retrieval. Frozen blocks before the first selected one
   are replaced by their recorded output, and a block's attention is skipped unless the
   realisation reads the heads: same result, less compute.)
3. Realisations, fresh in every selected block (--realisations), all with output zero at start:
   hive       latent bank U (n² × d_l, zero) + per-head P_h (d_l × d_h, N(0, 1/d_l)):
              o_h = (Σ w·U[slot]) P_h, concatenated. HML's own forward, n²·d_l + H·d_l·d_h
              parameters per block: the reference count.
   shared     one table n² × d_h (zero) read by every head: n²·d_h parameters, no head-specific values.
   dense_ffn  SwiGLU down(silu(gate(n)) · up(n)) on n = attn_norm(x), the input a Transformer
              block's FFN reads, i.e. the 'dense FFN residual' of the claim; ignores retrieval.
              Hidden width round(HIVE count / 3d), so 3·d·hidden matches HIVE (exactly for the
              kit's power-of-two sizes); gate/up N(0, 1/d), down zero.
   per_head   (opt-in) H tables n² × d_h (zero): explicit head-specific values, H·n²·d_h.
   dense_ffn_heads  (opt-in) the same FFN on the memory's query (the concatenated attention
              heads): the very information retrieval saw; runs the frozen attention.
   (combine: sum checkpoints: width d instead of d_h throughout.)
4. Fit. Every (realisation, learning rate) pair starts from torch.manual_seed(--seed) and
   trains alone: AdamW (constant rate, weight decay 0, betas 0.9/0.95), --steps steps over
   the recorded training batches in one fixed order (cycled), next-token cross entropy.
   Each --learning_rate is tried because sparse tables and a dense FFN prefer different
   rates; a realisation's row reports its rate with the lowest train loss (the fitted
   objective; validation never selects).
5. Report, per realisation and anchor ('checkpoint': trained values, 'zero': memory output
   removed): value parameters over the selected blocks; train loss (token mean over the
   final pass through the recorded training batches, each met once; an evaluation after
   fitting for anchors and runs shorter than one pass); val loss and perplexity; and
   train_gain / val_gain = (zero - loss) / (zero - checkpoint), the share of the trained
   memory's gain reached (unstable when the two anchors are close: the table notes it).
   Written to <out_dir>/fixed_retrieval.{csv,md} (the CSV has every rate) and .png (train
   loss curves of the reported fits, also a TensorBoard image in the run directory).
"""

class ProtocolHelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the protocol's line breaks and indentation kept."""


CSV_FIELDS = (
    "realisation",
    "learning_rate",
    "reported",
    "params",
    "train_loss",
    "val_loss",
    "val_ppl",
    "train_gain",
    "val_gain",
)


@dataclass
class Outcome:
    name: str
    params: int
    train_loss: float
    val_loss: float
    curve: list[float] = field(default_factory=list)
    learning_rate: float | None = None


def hml_blocks(model: MidusLM, requested: list[int], checkpoint_path: str) -> list[int]:
    """Indices of the memory blocks to analyse; ValueError when there are none or one is not HML."""
    memory = {i: type(b.branch).__name__ for i, b in enumerate(model.blocks) if isinstance(b, MemoryBlock)}
    hml = [i for i, b in enumerate(model.blocks) if isinstance(b, MemoryBlock) and isinstance(b.branch, HeadwiseMemory)]
    if not hml:
        found = f"its memory blocks {memory} have no head-wise values" if memory else "it has no memory blocks"
        raise ValueError(
            f"--ckpt_path: {checkpoint_path!r} has no HML memory block ({found}); fixed-retrieval compares "
            "value realisations of HML (MIDUS) memory blocks"
        )
    for index in requested:
        if index not in hml:
            raise ValueError(
                f"--blocks: {index} is not an HML memory block of the checkpoint; its HML blocks are {hml}"
            )
    return sorted(set(requested)) if requested else hml


def fit_realisation(
    model: MidusLM,
    recording: Recording,
    name: str,
    steps: int,
    learning_rate: float,
    seed: int,
    build=build_realisation,
) -> Outcome:
    """Put `name` (built by `build(name, shape)`) in every recorded block, fit it, evaluate, restore the model."""
    torch.manual_seed(seed)
    feed, train = RetrievalFeed(), recording.train
    realisations: dict[int, Realisation] = {i: build(name, recording.shapes[i]) for i in recording.blocks}
    originals = dict(enumerate(model.blocks[: recording.blocks[-1] + 1]))
    for index in range(recording.blocks[0]):
        model.blocks[index] = CachedPrefix(originals[index], feed, last=index == recording.blocks[0] - 1)
    for index, realisation in realisations.items():
        model.blocks[index] = FixedRetrievalBlock(originals[index], realisation, feed, index)
    try:
        parameters = [p for r in realisations.values() for p in r.parameters()]
        curve: list[float] = []
        if parameters and steps:
            optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
            for step in range(steps):
                loss = loss_of(model, feed, train[step % len(train)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                curve.append(loss.item())
        if len(curve) >= len(train):
            # The final pass met every recorded batch once: its losses are the train loss, at no extra cost.
            last = range(len(curve) - len(train), len(curve))
            train_loss = token_mean([curve[step] for step in last], [train[step % len(train)] for step in last])
        else:
            train_loss = mean_loss(model, feed, train)
        val_loss = mean_loss(model, feed, recording.val)
        return Outcome(
            name, sum(p.numel() for p in parameters), train_loss, val_loss, curve, learning_rate if parameters else None
        )
    finally:
        for index, block in originals.items():
            model.blocks[index] = block


def lowest_train_loss(fits: list[Outcome]) -> Outcome:
    """The fit with the lowest train loss; a diverged (NaN) one never wins."""
    return min(fits, key=lambda fit: fit.train_loss if math.isfinite(fit.train_loss) else math.inf)


def write_outputs(
    out_dir: Path, fits: list[Outcome], reported: list[Outcome], zero: Outcome, checkpoint: Outcome
) -> list[dict]:
    """fixed_retrieval.csv (every fit) and .md (anchors and reported fits) in `out_dir`; returns the CSV rows."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def gain(loss: float, zero_loss: float, checkpoint_loss: float) -> float:
        span = zero_loss - checkpoint_loss
        return round((zero_loss - loss) / span, 3) if span else math.nan

    def row(o: Outcome) -> dict:
        return {
            "realisation": o.name,
            "learning_rate": "" if o.learning_rate is None else o.learning_rate,
            "reported": o.learning_rate is None or any(o is r for r in reported),
            "params": o.params,
            "train_loss": round(o.train_loss, 4),
            "val_loss": round(o.val_loss, 4),
            "val_ppl": round(math.exp(o.val_loss), 2),
            "train_gain": gain(o.train_loss, zero.train_loss, checkpoint.train_loss),
            "val_gain": gain(o.val_loss, zero.val_loss, checkpoint.val_loss),
        }

    rows = [row(o) for o in [checkpoint, zero, *fits]]
    with open(out_dir / "fixed_retrieval.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    shown = [field for field in CSV_FIELDS if field != "reported"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += [
        "| " + " | ".join(f"{r[k]:,}" if k == "params" else str(r[k]) for k in shown) + " |"
        for r in rows
        if r["reported"]
    ]
    rates = sorted({fit.learning_rate for fit in fits})
    for fit in reported:
        if len(rates) > 1 and fit.learning_rate in (rates[0], rates[-1]):
            lines.append(
                f"\nNote: {fit.name}'s lowest train loss is at the edge of the --learning_rate grid "
                f"({fit.learning_rate:g}); a rate beyond it may fit better."
            )
    for split in ("train", "val"):
        span = getattr(zero, f"{split}_loss") - getattr(checkpoint, f"{split}_loss")
        if abs(span) < 0.01:
            lines.append(
                f"\nNote: the trained memory changes the {split} loss by only {span:+.4f} nats "
                f"(zero - checkpoint), so {split}_gain is unstable; compare the losses."
            )
    (out_dir / "fixed_retrieval.md").write_text("# Fixed retrieval\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return rows


def draw_curves(reported: list[Outcome], zero: Outcome, checkpoint: Outcome):
    """Train-loss curves (running mean) of the reported fits, with the anchors as horizontal lines."""
    figure = new_figure(7, 4.5)
    axes = figure.add_subplot()
    for outcome in reported:
        curve = torch.tensor(outcome.curve or [outcome.train_loss])
        window = max(1, len(curve) // 20)  # single batches are noisy
        smooth = curve.unfold(0, window, 1).mean(1)
        axes.plot(
            range(window, window + len(smooth)),
            smooth.tolist(),
            label=f"{outcome.name}, lr {outcome.learning_rate:g} ({outcome.params:,} params)",
        )
    for anchor, style in ((checkpoint, "--"), (zero, ":")):
        axes.axhline(anchor.train_loss, color="gray", linestyle=style, label=f"{anchor.name} (recorded train batches)")
    axes.set_xlabel("step")
    axes.set_ylabel("train loss")
    axes.set_title("Value realisations fitted on fixed retrieval")
    axes.legend(fontsize="x-small")
    return figure


def run(args: list[str]) -> list[dict]:
    """Parse, record, fit every realisation at every rate, write the outputs; returns the CSV rows."""
    parser = analysis_parser("fixed-retrieval", DESCRIPTION)
    parser.formatter_class = ProtocolHelpFormatter
    parser.add_argument(
        "--realisations", type=list[str], default=DEFAULT_REALISATIONS, help=f"Fitted, of {list(REALISATIONS)}."
    )
    parser.add_argument(
        "--blocks", type=list[int], default=[], help="Memory block indices analysed (empty: every HML memory block)."
    )
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps per fit.")
    parser.add_argument(
        "--learning_rate",
        type=Union[float, list[float]],
        default=DEFAULT_LEARNING_RATES,
        help="Constant AdamW rate, or a list tried for every realisation.",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per fitting step and per recorded batch.")
    parser.add_argument("--train_batches", type=int, default=64, help="Training batches recorded and cycled through.")
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the training-block draw and of every initialisation."
    )
    loaded = load_checkpoint_run(parser, args)
    options, model, data = loaded.args, loaded.model, loaded.data
    rates = options.learning_rate if isinstance(options.learning_rate, list) else [options.learning_rate]
    unknown = sorted(set(options.realisations) - set(REALISATIONS))
    if unknown or not options.realisations:
        raise ValueError(f"--realisations: {unknown or 'none given'}; choose from {list(REALISATIONS)}")
    if options.steps < 0 or options.max_batches < 0:
        raise ValueError(f"--steps and --max_batches must be >= 0, got {options.steps} and {options.max_batches}")
    if min(options.train_batches, options.batch_size) < 1 or not rates or min(rates) <= 0:
        raise ValueError(
            f"--train_batches, --batch_size and every --learning_rate must be positive, got {rates} for the rates"
        )
    blocks = hml_blocks(model, options.blocks, str(loaded.checkpoint_path))
    model.requires_grad_(False)  # frozen: only a realisation's own parameters train

    started = time.perf_counter()
    size = options.batch_size
    draw = torch.randperm(len(data.train_blocks), generator=torch.Generator().manual_seed(options.seed))
    train_ids = batched(data.train_blocks, size, draw[: options.train_batches * size].tolist())
    val_ids = batched(data.val_blocks, size, list(range(len(data.val_blocks))))[: options.max_batches or None]
    recording = record(model, blocks, train_ids, val_ids)
    checkpoint = Outcome(
        "checkpoint", sum(value_parameters(model.blocks[i].branch) for i in blocks), *recording.checkpoint_losses
    )
    zero = fit_realisation(model, recording, "zero", 0, 1.0, options.seed)
    print(
        f"recorded blocks {blocks}: {len(recording.train)} train / {len(recording.val)} val batches of {size} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    fits, reported = [], []
    for name in options.realisations:
        for rate in rates:
            started = time.perf_counter()
            fits.append(fit_realisation(model, recording, name, options.steps, rate, options.seed))
            print(
                f"{name} lr {rate:g}: train loss {fits[-1].train_loss:.4f}, val loss {fits[-1].val_loss:.4f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
        reported.append(lowest_train_loss(fits[-len(rates) :]))
    rows = write_outputs(loaded.out_dir, fits, reported, zero, checkpoint)
    png = loaded.out_dir / "fixed_retrieval.png"
    write_figure(draw_curves(reported, zero, checkpoint), png, loaded.run_dir, TAG, loaded.step)
    print((loaded.out_dir / "fixed_retrieval.md").read_text(encoding="utf-8"))
    print(f"written to {loaded.out_dir}")
    return rows


def main(args: list[str]) -> None:
    """Entry point of ``python -m midus fixed-retrieval``."""
    try:
        run(args)
    except (ValueError, FileNotFoundError) as error:
        fail_cleanly(error)
