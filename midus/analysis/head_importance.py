"""``python -m midus head-importance``: how much the model relies on each memory head.

A per-head gate on the retrieval weights of every `ProductKeys` module, attached by forward
hooks only while the analysis runs (`midus.model.head_gates`, which also takes the measures),
zeroes (gate 0) or keeps (gate 1) that head's memory read in every value layout. Two measures
per memory block and head, over the same validation batches:

* ablation: mean validation loss with the head's gate at 0 minus the loss with every gate
  at 1 (token-weighted mean cross entropy; one forward pass per head and batch);
* gradient × activation (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"):
  with every gate a ones vector that requires grad, d loss / d gate_h = Σ_tokens ⟨∂L/∂o_h, o_h⟩
  for the head's memory output o_h. As in their code the absolute value is taken per batch
  (of the batch's summed token loss) and summed, then divided by the number of tokens; so
  signs that cancel across batches still count. Their per-layer normalisation (divide by
  the block's L2 norm over heads) is reported beside the raw value, which stays in nats
  per token and so comparable across blocks and with the ablation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from midus.analysis.checkpoint_run import analysis_parser, fail_cleanly, load_checkpoint_run
from midus.analysis.figures import decimal_format, draw_heatmap, new_figure, write_figure
from midus.analysis.memory_report import memory_keys_of, validation_batches, write_csv
from midus.model.head_gates import gated_head_losses, gated_memory_heads
from midus.model.retrieval.product_keys import ProductKeys

DESCRIPTION = """Importance of every memory head of a checkpoint, measured two ways on the validation split.

For every product-key memory (labelled by block index) and head: loss_increase, the mean
validation cross entropy with that head's retrieval weights gated to zero (its memory output
removed) minus the baseline with no head removed, over the same batches; and grad_x_act,
gradient x activation of the head's memory output (Michel et al. 2019): |d loss / d gate|
of a gate of 1 on the head, absolute value per batch, summed and divided by the tokens
(nats per token), plus grad_x_act_normalised, divided by the block's L2 norm over heads as
Michel et al. do. Writes head_importance.csv and head_importance.png (heatmaps blocks x
heads) to --out_dir, and the figure as TensorBoard image analysis/head_importance in the run
directory. Costs, per batch, a baseline forward pass, one forward pass per head, and one
forward and backward pass for the gradients."""

TAG = "analysis/head_importance"
FIELDS = ["block", "head", "baseline_loss", "ablated_loss", "loss_increase", "grad_x_act", "grad_x_act_normalised"]


@dataclass
class HeadImportance:
    """Both importance measures of every memory head, by block label; tensors are (heads,)."""

    baseline_loss: float
    ablated_loss: dict[str, torch.Tensor]
    grad_x_act: dict[str, torch.Tensor]
    tokens: int

    @property
    def loss_increase(self) -> dict[str, torch.Tensor]:
        """Validation loss with the head removed minus the baseline (nats per token)."""
        return {label: loss - self.baseline_loss for label, loss in self.ablated_loss.items()}

    @property
    def grad_x_act_normalised(self) -> dict[str, torch.Tensor]:
        """`grad_x_act` divided by its block's L2 norm over heads (Michel et al.'s per-layer normalisation)."""
        return {label: values / (values.norm() + 1e-20) for label, values in self.grad_x_act.items()}

    def rows(self) -> list[dict[str, float | int | str]]:
        """One row per block and head with the `FIELDS` of head_importance.csv."""
        increase, normalised = self.loss_increase, self.grad_x_act_normalised
        return [
            {
                "block": label,
                "head": head,
                "baseline_loss": self.baseline_loss,
                "ablated_loss": float(self.ablated_loss[label][head]),
                "loss_increase": float(increase[label][head]),
                "grad_x_act": float(self.grad_x_act[label][head]),
                "grad_x_act_normalised": float(normalised[label][head]),
            }
            for label in self.ablated_loss
            for head in range(len(self.ablated_loss[label]))
        ]


def head_importance(
    model: nn.Module, keys: dict[str, ProductKeys], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> HeadImportance:
    """Ablation loss and gradient × activation of every head of the memories `keys` of `model`.

    Gates are hooked onto `keys` only while this runs; parameters are left without gradients.
    """
    with gated_memory_heads(keys) as gates:
        sums = gated_head_losses(model, gates, {label: module.n_heads for label, module in keys.items()}, batches)
    if sums.tokens == 0:
        raise ValueError("data: the validation split has no batches to analyse")
    tokens = sums.tokens
    return HeadImportance(
        sums.baseline / tokens,
        {label: losses / tokens for label, losses in sums.ablated.items()},
        {label: values / tokens for label, values in sums.grad_x_act.items()},
        tokens,
    )


def draw_head_importance(result: HeadImportance) -> Figure:
    """Two heatmaps, blocks × heads: loss increase when the head is removed, and gradient × activation."""
    labels = list(result.ablated_loss)
    n_heads = max(len(values) for values in result.ablated_loss.values())

    def grid(values: dict[str, torch.Tensor]) -> np.ndarray:
        cells = np.full((len(labels), n_heads), np.nan)  # blocks may differ in heads: blank cells
        for row, label in enumerate(labels):
            cells[row, : len(values[label])] = values[label].numpy()
        return cells

    panel_height = 1.5 + 0.4 * len(labels)
    if n_heads <= 8:  # side by side
        fig = new_figure(11.0, panel_height + 0.5)
        loss_ax, grad_ax = fig.subplots(1, 2)
    else:  # one above the other, each as wide as the page allows
        fig = new_figure(min(16.0, 3.0 + 0.45 * n_heads), 2 * panel_height + 0.5)
        loss_ax, grad_ax = fig.subplots(2, 1)
    block_names = [f"block {label}" for label in labels]
    head_names = [str(head) for head in range(n_heads)]
    increase, grad_x_act = grid(result.loss_increase), grid(result.grad_x_act)
    draw_heatmap(
        loss_ax,
        increase,
        block_names,
        head_names,
        f"val loss increase when the head is removed\n(baseline loss {result.baseline_loss:.4f})",
        "nats per token",
        cmap="RdBu_r",
        centred=True,
        value_format=decimal_format(increase, signed=True),
    )
    draw_heatmap(
        grad_ax,
        grad_x_act,
        block_names,
        head_names,
        "gradient × activation\n|d loss / d head gate| (Michel et al. 2019)",
        "nats per token",
        cmap="magma",
        value_format=decimal_format(grad_x_act),
    )
    for ax in (loss_ax, grad_ax):
        ax.set_xlabel("head")
    fig.suptitle(f"memory head importance over {result.tokens:,} validation tokens")
    return fig


def build_parser():
    """The command's parser: the shared analysis options only."""
    return analysis_parser("head-importance", DESCRIPTION)


def main(args: list[str]) -> None:
    """``python -m midus head-importance --ckpt_path <ckpt> [--out_dir DIR] [--max_batches N] ...``."""
    try:
        run = load_checkpoint_run(build_parser(), args)
        keys = memory_keys_of(run)
        device = next(run.model.parameters()).device
        result = head_importance(run.model, keys, validation_batches(run.data, run.args.max_batches, device))
    except (ValueError, FileNotFoundError) as error:
        fail_cleanly(error)
    rows = result.rows()
    csv_path, png_path = run.out_dir / "head_importance.csv", run.out_dir / "head_importance.png"
    write_csv(rows, csv_path, FIELDS)
    write_figure(draw_head_importance(result), png_path, run.run_dir, TAG, run.step)
    print(
        f"head importance of {run.checkpoint_path} over {result.tokens:,} validation tokens; "
        f"baseline loss {result.baseline_loss:.4f}"
    )
    print(f"{'block':>5} {'head':>4} {'loss_increase':>13} {'grad_x_act':>10} {'normalised':>10}")
    for row in sorted(rows, key=lambda row: -row["loss_increase"]):
        print(
            f"{row['block']:>5} {row['head']:>4} {row['loss_increase']:>+13.5f} "
            f"{row['grad_x_act']:>10.5f} {row['grad_x_act_normalised']:>10.3f}"
        )
    print(f"wrote {csv_path} and {png_path}; TensorBoard image {TAG} in {run.run_dir}")
