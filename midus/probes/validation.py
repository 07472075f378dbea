"""`ValidationProbes`: everything a validation measures besides ``val/loss``, as one object.

The LightningModule calls three methods, and nothing here reaches back into it::

    on_validation_epoch_start  ->  probes.start(model, full=...)
    validation_step            ->  probes.observe(model, inputs, targets, loss, tokens)   (after val/loss's forward)
    on_validation_epoch_end    ->  probes.finish(model, questions, tokenizer, processes)  -> metrics

What runs (``model.probes``, `ProbeConfig`), at every full validation:

* slot usage of the product-key memories over the validation text (`SlotUsageTracker`);
* the memory-zeroed loss, batch by batch beside the intact one (`ZeroedMemoryLoss`), so it reads
  exactly the batches ``val/loss`` reads, ``limit_val_batches`` included;
* the recall probe (`recall_metrics`) and knowledge bits (`knowledge_bits_metrics`), which read the
  embedded corpus's questions rather than the validation batches;
* the recall probe again with the memories zeroed, for ``memory/zeroed/<recall>_drop``.

A partial sanity check (a few batches before training) is not a full validation: it measures
nothing. The shape follows torchtitan's ``components/validate.py``: validation is a component of its
own, built from its own config section, which the training loop calls without it reaching back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from midus.data.recall_probe import TokenizedQuestion
from midus.model.retrieval.slot_usage import SlotUsageTracker, product_key_modules
from midus.probes import knowledge_bits
from midus.probes.memory_zeroed import ZeroedMemoryLoss, zeroed_recall
from midus.probes.processes import Processes
from midus.probes.recall import recall_metrics


@dataclass
class ProbeConfig:
    """The validation probes (`midus.probes.ValidationProbes`); each runs at every full validation.

    Every probe reads what ``val/loss`` reads: the memory-zeroed loss the very batches
    (``trainer.limit_val_batches`` included), the recall and knowledge probes the embedded corpus's
    questions; in several processes each sums its counts over them as ``val/loss`` does.
    """

    recall_questions: int = 600
    """Recall questions per prompt phrasing and population scored at each validation (0 turns the
    probe off); logged as ``val/recall_acc`` (phrasing seen in training), ``val/recall_acc_heldout``
    (held-out phrasing), ``val/recall_acc_replay[_heldout]`` (the replayed population), and per
    attribute under ``…/<attribute>``. Embedded corpus only."""
    knowledge_bits_people: int = 0
    """People of each population whose every fact is scored against all values of its attribute, for
    ``val/knowledge_bits`` (main population) and ``val/knowledge_bits_replay``: bits stored, scaled to
    the whole population, per attribute under ``…/<attribute>`` (`midus.probes.knowledge_bits`); 0 turns
    it off. experiments/README.md measures its cost and how well 16 people estimate all of them."""
    memory_zeroed: bool = True
    """For a model with memory branches, score every validation batch a second time with every memory
    branch's output zeroed (one extra forward per batch for all memory blocks together), and the recall
    probe once more: ``memory/zeroed/loss_delta`` (loss increase, nats; exactly 0 at insertion) and
    ``memory/zeroed/<recall>_drop`` (recall lost). The run summary records the final values as
    ``memory_zeroed_delta``."""
    memory_zeroed_per_block: bool = False
    """Also zero each memory block's branch alone, under ``memory/zeroed/<block>/…``: one more forward
    per batch and recall pass per memory block (with a single memory block it is the same measurement,
    reported under both names at no cost)."""
    slot_usage: bool = True
    """Count product-key slot reads over the validation text: ``memory/<block>[/<head>]/usage``,
    ``kl_uniform`` and ``entropy`` (`midus.model.retrieval.slot_usage`)."""

    def __post_init__(self) -> None:
        if self.recall_questions < 0:
            raise ValueError(f"model.probes.recall_questions must be >= 0, got {self.recall_questions}")
        if self.knowledge_bits_people < 0:
            raise ValueError(f"model.probes.knowledge_bits_people must be >= 0, got {self.knowledge_bits_people}")
        if self.memory_zeroed_per_block and not self.memory_zeroed:
            raise ValueError("model.probes.memory_zeroed_per_block needs model.probes.memory_zeroed: true")


class ValidationProbes:
    """The validation probes of one model, configured by `ProbeConfig` (see the module docs)."""

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        self._full = False
        self._usage: SlotUsageTracker | None = None
        self._zeroed: ZeroedMemoryLoss | None = None

    def start(self, model: nn.Module, full: bool, memory_zeroed: bool = True) -> None:
        """A validation begins; `full`: a scheduled one (not a partial sanity check), the only kind
        probed. `memory_zeroed`: whether the strategy allows the zeroed passes (False under FSDP,
        whose weights outside a forward are shards)."""
        self._full = full
        self._usage = self._zeroed = None
        if not full:
            return
        if self.config.slot_usage and product_key_modules(model):
            self._usage = SlotUsageTracker(model).start()
        if self.config.memory_zeroed and memory_zeroed:
            zeroed = ZeroedMemoryLoss(model, self.config.memory_zeroed_per_block)
            self._zeroed = zeroed if zeroed.blocks else None

    def observe(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor,
                tokens: int) -> None:
        """One validation batch, after its intact forward gave `loss` over `tokens` targets."""
        if self._zeroed is None:
            return
        if self._usage is not None:
            with self._usage.paused():  # slot usage counts the intact model's reads only
                self._zeroed.observe(model, inputs, targets, loss, tokens)
        else:
            self._zeroed.observe(model, inputs, targets, loss, tokens)

    def finish(self, model: nn.Module, questions: dict[str, list[TokenizedQuestion]],
               tokenizer: PreTrainedTokenizerBase | None, processes: Processes) -> dict[str, torch.Tensor | float]:
        """The validation ends: every probe's metrics, already summed over the processes."""
        metrics: dict[str, torch.Tensor | float] = {}
        # Slot usage of the validation text alone: stop before the recall probe's forwards.
        if self._usage is not None:
            metrics.update(self._usage.stop(reduce=processes.sum))
        zeroed, full = self._zeroed, self._full
        self._full, self._usage, self._zeroed = False, None, None
        if not full:
            return metrics

        def recall() -> dict[str, torch.Tensor]:
            return recall_metrics(model, questions, self.config.recall_questions, processes)

        intact_recall = recall() if self.config.recall_questions else {}
        metrics.update(intact_recall)
        if self.config.knowledge_bits_people and tokenizer is not None:
            metrics.update(knowledge_bits.knowledge_bits_metrics(
                model, questions, tokenizer, self.config.knowledge_bits_people, processes
            ))
        if zeroed is not None:
            found = zeroed.deltas(processes.sum, processes.device)
            if intact_recall:
                found.update(zeroed_recall(model, zeroed.settings, intact_recall, recall))
            if len(zeroed.blocks) == 1:  # all memory blocks = that block: one measurement, both names
                found.update({name.replace("zeroed/", f"zeroed/{zeroed.blocks[0]}/"): value
                              for name, value in found.items()})
            metrics.update(found)
        return metrics
