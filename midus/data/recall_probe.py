"""The knowledge-recall probe as token ids: what the model reads and what it should answer.

Scoring it with a model is `midus.probes.recall`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from midus.data.corpus import RecallItem
from midus.data.framing import frame_documents


@dataclass(frozen=True)
class TokenizedQuestion:
    """A recall item as token ids: the model reads `prompt`, should continue with `answer`."""

    prompt: list[int]
    answer: list[int]
    attribute: str


def tokenize_probe(items: list[RecallItem], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedQuestion]:
    """Prompts start as every packed training document does: after an end-of-text token, framed the
    way the tokenizer frames a document (a Llama-3 tokenizer's BOS first; `midus.data.framing`)."""
    eos = tokenizer.eos_token_id
    prompts = frame_documents(tokenizer, [item.prompt for item in items])
    answers = tokenizer([" " + item.answer for item in items], add_special_tokens=False)["input_ids"]
    return [
        TokenizedQuestion([eos, *prompt], answer, item.attribute)
        for prompt, answer, item in zip(prompts, answers, items)
    ]
