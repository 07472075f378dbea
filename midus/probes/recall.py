"""The knowledge-recall probe scored with a model: ``val/recall_acc…`` (plain PyTorch, no Lightning).

Greedy decoding of "<name> was born in" yields the answer iff, fed prompt + answer, the
model's argmax at every answer position is the answer's next token. Scoring by that
teacher-forced check gives exactly the greedy result, in one batched forward pass
per batch of questions instead of one decoding loop per question.
"""

from __future__ import annotations

import torch
from torch import nn

from midus.data.recall_probe import TokenizedQuestion
from midus.probes.processes import Processes


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


def recall_metrics(
    model: nn.Module, questions_by_phrasing: dict[str, list[TokenizedQuestion]], limit: int, processes: Processes
) -> dict[str, torch.Tensor]:
    """Recall accuracy per prompt phrasing and population, overall and per attribute.

    The first `limit` questions of each phrasing are asked. Each process answers every
    world_size-th of them; hits and counts are summed over the processes, so the accuracies are
    those of one process answering all of them.
    """
    hits_and_counts: dict[str, list[float]] = {}  # metric -> [hits, questions] of this process
    for phrasing, questions in questions_by_phrasing.items():
        questions = questions[:limit]
        if not questions:
            continue
        name = "val/recall_acc" if phrasing == "train" else f"val/recall_acc_{phrasing}"
        # The same keys in the same order on every process, whatever its share holds.
        for key in [name, *(f"{name}/{attribute}" for attribute in dict.fromkeys(q.attribute for q in questions))]:
            hits_and_counts[key] = [0.0, 0.0]
        mine = questions[processes.rank :: processes.world_size]
        hits = greedy_recall_hits(model, mine).tolist() if mine else []
        for question, hit in zip(mine, hits):
            for key in (name, f"{name}/{question.attribute}"):
                hits_and_counts[key][0] += hit
                hits_and_counts[key][1] += 1
    if not hits_and_counts:
        return {}
    # One collective for all of them; float32 counts are exact far beyond any probe size.
    totals = processes.sum(torch.tensor(list(hits_and_counts.values()), device=processes.device))
    return {name: hits / count for name, (hits, count) in zip(hits_and_counts, totals)}
