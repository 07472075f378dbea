"""``memory/zeroed/…``: what a validation loses when the memory branches output zero.

A memory layer that trains but is not read is the failure that makes a MIDUS-vs-DUS or
HIVE-vs-shared comparison meaningless. At each full validation `CausalLM` measures it:
validation loss and recall with every memory branch zeroed (`midus.model.branches.zeroing`),
then with each memory block's alone, against the same model intact:

* ``memory/zeroed/loss_delta``: zeroed minus intact validation loss, nats (> 0: the memory helps);
* ``memory/zeroed/<recall>_drop``: intact minus zeroed recall accuracy, per prompt phrasing and
  population (``recall_acc_drop``, ``recall_acc_heldout_drop``, ``recall_acc_replay_drop``, …);
* the same per memory block under ``memory/zeroed/<block>/…``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric

from midus.model.branches.zeroing import memory_branches, zeroed_memory


def zeroed_memory_metrics(module: pl.LightningModule, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``memory/zeroed/…`` of a `CausalLM`'s model against its intact validation `metrics` (empty
    without memory); uses the module's loss, recall probe and cross-process sum."""
    blocks = list(memory_branches(module.model))
    if not blocks:
        return {}
    # With one memory block, "all" and that block are the same measurement: measured once.
    settings = [("", None)] + ([(f"{block}/", [block]) for block in blocks] if len(blocks) > 1 else [])
    zeroed: dict[str, torch.Tensor] = {}
    for prefix, chosen in settings:
        with zeroed_memory(module.model, chosen):
            loss = validation_loss(module)
            recall = module._recall_metrics()
        zeroed[f"memory/zeroed/{prefix}loss_delta"] = loss - metrics["val/loss"]
        for name, value in recall.items():
            if name.count("/") == 1:  # per phrasing and population, not per attribute
                zeroed[f"memory/zeroed/{prefix}{name.removeprefix('val/')}_drop"] = metrics[name] - value
    if len(blocks) == 1:
        zeroed.update({name.replace("zeroed/", f"zeroed/{blocks[0]}/"): value for name, value in zeroed.items()})
    return zeroed


@torch.no_grad()
def validation_loss(module: pl.LightningModule) -> torch.Tensor:
    """Token-weighted loss of the model as it is now on the validation split, over all processes."""
    trainer = module.trainer
    mean = MeanMetric().to(module.device)  # as validation_step's: token-weighted, synced over processes
    with trainer.precision_plugin.val_step_context():  # the precision validation_step ran in
        for batch in trainer.val_dataloaders:
            loss, tokens = module._loss({"input_ids": batch["input_ids"].to(module.device)})
            mean.update(loss, weight=tokens)
    return mean.compute()
