"""The knowledge-recall probe as token ids: what the model reads and what it should answer.

Scoring it with a model is `midus.probes.recall`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from midus.data.corpus import RecallItem
from midus.data.framing import frame_prompts


@dataclass(frozen=True)
class TokenizedQuestion:
    """A recall item as token ids: the model reads `prompt`, should continue with `answer`."""

    prompt: list[int]
    answer: list[int]
    attribute: str


def tokenize_probe(items: list[RecallItem], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedQuestion]:
    """Prompts start as a document does (`midus.data.framing.frame_prompts`, the rule predict prompts
    and lm-eval contexts follow too): the tokenizer's BOS first (Llama-3), else the end-of-text token
    every packed document of the kit's own tokenizers follows."""
    prompts = frame_prompts(tokenizer, [item.prompt for item in items])
    answers = tokenizer([" " + item.answer for item in items], add_special_tokens=False)["input_ids"]
    return [
        TokenizedQuestion(prompt, answer, item.attribute)
        for prompt, answer, item in zip(prompts, answers, items)
    ]
