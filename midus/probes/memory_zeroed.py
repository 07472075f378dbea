"""``memory/zeroed/…``: what validation loses when the memory branches output zero.

A memory layer that trains but is not read is the failure that makes a MIDUS-vs-DUS or
HIVE-vs-shared comparison meaningless. At each full validation the probes measure it on the very
batches ``val/loss`` reads (`ZeroedMemoryLoss`: each batch is scored a second time with every memory
branch zeroed, `midus.model.branches.zeroing`), and on the recall probe once more (`zeroed_recall`):

* ``memory/zeroed/loss_delta``: zeroed minus intact validation loss, nats (> 0: the memory helps;
  exactly 0 at insertion, where every memory output is already zero);
* ``memory/zeroed/<recall>_drop``: intact minus zeroed recall accuracy, per prompt phrasing and
  population (``recall_acc_drop``, ``recall_acc_heldout_drop``, ``recall_acc_replay_drop``, …);
* with ``model.probes.memory_zeroed_per_block``, the same per memory block under
  ``memory/zeroed/<block>/…`` (one more forward per batch and block).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from midus.model.branches.zeroing import memory_branches, zeroed_memory
from midus.model.transformer import next_token_loss


class ZeroedMemoryLoss:
    """Token-weighted validation loss with memory branches zeroed, beside the intact loss of the same batches.

    `settings` are (metric prefix, blocks zeroed): ``("", None)`` zeroes every memory branch; per block
    adds ``("<block>/", ["<block>"])`` for each. The sums are float64 and the intact and zeroed losses
    of a batch are accumulated alike, so equal losses give a delta of exactly 0.
    """

    def __init__(self, model: nn.Module, per_block: bool) -> None:
        self.blocks = list(memory_branches(model))
        several = per_block and len(self.blocks) > 1
        self.settings: list[tuple[str, list[str] | None]] = [("", None)]
        self.settings += [(f"{block}/", [block]) for block in self.blocks] if several else []
        # Row 0: intact; row i: settings[i - 1]; columns: sum of loss x tokens, tokens.
        self.sums = torch.zeros(len(self.settings) + 1, 2, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, intact_loss: torch.Tensor,
                tokens: int) -> None:
        """Add one validation batch: its intact loss (already computed) and each zeroed setting's."""
        losses = [intact_loss.detach()]
        for _, blocks in self.settings:
            with zeroed_memory(model, blocks):
                losses.append(next_token_loss(model(inputs), targets))
        stacked = torch.stack([loss.double() for loss in losses])
        self.sums = self.sums.to(stacked.device)  # kept where the model runs: no host sync per batch
        self.sums[:, 0] += stacked * tokens
        self.sums[:, 1] += tokens

    def deltas(self, sum_over_processes: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str
               ) -> dict[str, torch.Tensor]:
        """``memory/zeroed/[<block>/]loss_delta`` over every process's batches."""
        totals = sum_over_processes(self.sums.to(device)).cpu()
        means = totals[:, 0] / totals[:, 1].clamp_min(1)
        return {f"memory/zeroed/{prefix}loss_delta": (means[row + 1] - means[0]).float()
                for row, (prefix, _) in enumerate(self.settings)}


def zeroed_recall(model: nn.Module, settings: list[tuple[str, list[str] | None]], intact: dict[str, torch.Tensor],
                  recall: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``memory/zeroed/[<block>/]<recall>_drop``: `intact` recall minus `recall()` run under each setting
    (per phrasing and population; per-attribute accuracies are not repeated)."""
    drops: dict[str, torch.Tensor] = {}
    for prefix, blocks in settings:
        with zeroed_memory(model, blocks):
            zeroed = recall()
        for name, value in zeroed.items():
            if name.count("/") == 1:  # val/recall_acc…, not val/recall_acc…/<attribute>
                drops[f"memory/zeroed/{prefix}{name.removeprefix('val/')}_drop"] = intact[name] - value
    return drops
