"""``model.probes``: what each validation measures besides ``val/loss``."""

from __future__ import annotations

from dataclasses import dataclass


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
