"""Score the knowledge-recall probe with a model (plain PyTorch, no Lightning).

Greedy decoding of "<name> was born in" yields the answer iff, fed prompt + answer, the
model's argmax at every answer position is the answer's next token. Scoring by that
teacher-forced check gives exactly the greedy result, in one batched forward pass
per batch of questions instead of one decoding loop per question.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from midus.data.corpus import RecallItem


@dataclass(frozen=True)
class TokenizedQuestion:
    """A recall item as token ids: the model reads `prompt`, should continue with `answer`."""

    prompt: list[int]
    answer: list[int]
    attribute: str


def tokenize_probe(items: list[RecallItem], tokenizer: PreTrainedTokenizerBase) -> list[TokenizedQuestion]:
    """Prompts start after an end-of-text token, as every packed training document does."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([item.prompt for item in items], add_special_tokens=False)["input_ids"]
    answers = tokenizer([" " + item.answer for item in items], add_special_tokens=False)["input_ids"]
    return [
        TokenizedQuestion([eos, *prompt], answer, item.attribute)
        for prompt, answer, item in zip(prompts, answers, items)
    ]


@torch.no_grad()
def greedy_recall_hits(
    model: nn.Module, questions: list[TokenizedQuestion], batch_size: int = 64
) -> torch.Tensor:
    """Bool tensor: does the greedy continuation of each prompt begin with its answer tokens?

    `model(ids)` must return logits (batch, time, vocab) of a causal LM: the right padding
    used to batch questions never influences earlier positions.
    """
    device = next(model.parameters()).device
    hits: list[torch.Tensor] = []
    for first in range(0, len(questions), batch_size):
        chunk = questions[first : first + batch_size]
        sequences = [q.prompt + q.answer for q in chunk]
        width = max(len(seq) for seq in sequences) - 1
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(sequences):
            inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        predicted = model(inputs.to(device)).argmax(dim=-1).cpu()
        for row, question in enumerate(chunk):
            start = len(question.prompt) - 1  # the position that predicts the first answer token
            guess = predicted[row, start : start + len(question.answer)]
            hits.append(torch.equal(guess, torch.tensor(question.answer)) if question.answer else False)
    return torch.tensor(hits, dtype=torch.bool)
