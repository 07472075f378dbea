"""Knowledge capacity in bits: how much of the biography corpus's facts a model holds (no Lightning).

After Allen-Zhu & Li, "Physics of Language Models: Part 3.3" (2024), who count a model's stored
knowledge from its loss on attribute values against the entropy of the values: a fact whose value
is drawn uniformly from a value set V carries log2|V| bits, and a model that gives the true value
probability q saves log2|V| + log2 q of them (coding the value with the model instead of the
uniform prior). The expectation of that saving, summed over facts, is a lower bound on the
mutual information between the facts and the model (H(X) - E[-log2 q(X)] <= I), i.e. on the bits
its parameters hold about them; the sum over the probed facts estimates it.

Estimator, per probed question (a person's attribute, asked with a recall-probe prompt):

* V = ``value_choices(attribute)``, with the uniform prior the corpus draws from. ``birth_date``
  is drawn as independent uniform day (28), month (12) and year (50), which is the uniform prior
  over the 16 800 full date strings ``value_choices`` lists: V is that set (log2|V| = 14.04 bits);
* every v in V is scored by its teacher-forced log-likelihood after the prompt: the sum over the
  tokens of ``" v"`` (tokenized as `tokenize_probe` tokenizes answers) of log p(token | prompt,
  earlier tokens), in batched forwards without padding (the rows of one forward are equally long);
* q(v) = softmax over V of those scores: the model's distribution given that the answer is in V
  (V is prefix-free as strings, so no value's tokens are a prefix of another's and the scores
  are probabilities of disjoint continuations; `candidate_values` checks it);
* fact bits = log2|V| + log2 q(v*), v* the true value: log2|V| when q(v*) = 1, 0 for a uniform q,
  negative when the model puts less than 1/|V| on the truth.

Per population: sum the fact bits per attribute over the probed facts; when only the first
people of the population are probed (`people_sample`: the same people at every validation),
scale each sum by (people in the population) / (people probed), as facts of one attribute are
i.i.d.; clip each attribute's scaled sum at 0; the population's bits are the sum over attributes.
Clipped per attribute, not per fact: the unclipped sum estimates the information, and a
knowledge-free but miscalibrated model (e.g. one preferring short values, or " Paris" for
everyone) has an expected sum of -KL(uniform || q) < 0. Clipping each fact at 0 would count
every lucky guess of such a model as knowledge (the mean of max(0, x) exceeds max(0, mean x)
whenever x varies); clipping the attribute's sum only uses that information is >= 0, and facts
of independent attributes add. All facts known gives exactly sum(log2|V|) = 37.28 bits a person.

Assumptions: the prompt asks for one attribute (the probe's value-final phrasing); values are
independent of names (`generate_population` draws them after the names), so bits above 0 are
stored facts, not inferences. Renormalising over V does not charge the model for mass outside
V (not knowing the value set or the answer format), as a full-vocabulary loss would: each fact's
count is at least the full-vocabulary one (q(v*) >= p(v*), V's continuations being disjoint).

Cost: |V| values per fact, the 16 800 dates scored through the prefix tree of their tokens
(`CandidateValues`): each tree node is one token of one batched forward, level by level, the
prompt and the node's parent read from a KV cache where the model has one (`MidusLM`); with the
quickstart BPE of 1024 that is 2 045 tokens, not 16 800 x 3.8. A value set of at most 64
contexts (every other attribute) takes one forward of prompt + context rows instead.
What it costs a validation: experiments/README.md, "What the probes cost".
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from midus.data.corpus import ATTRIBUTES, value_choices
from midus.data.recall_probe import TokenizedQuestion
from midus.probes.processes import Processes


@dataclass(frozen=True)
class CandidateValues:
    """One attribute's value set V as token ids, arranged once as a prefix tree for scoring all of V.

    A node is a proper prefix of some value's tokens; level i holds the prefixes of i tokens (level
    0: the empty prefix, the prompt alone). Each node's next-token distribution is one position of
    one forward pass, shared by all the values below it. A small set is scored by `contexts`
    instead: one row per distinct value-but-its-last-token, all in one forward.
    """

    ids: tuple[tuple[int, ...], ...]
    """Token ids of ``" " + v`` per value v, in `value_choices` order."""
    tokens: torch.Tensor
    """(values, width) long: each value's tokens, right-padded with 0."""
    scored: torch.Tensor
    """(values, width) bool: which positions of `tokens` are the value's own."""
    nodes: torch.Tensor
    """(values, width) long: at position i, the index within level i of the value's first i tokens."""
    prefixes: tuple[torch.Tensor, ...]
    """Per level i = 1 .. width - 1: (nodes, i) long, the tokens of the level's nodes."""
    parents: tuple[torch.Tensor, ...]
    """Per level i = 1 .. width - 1: (nodes,) long, each node's parent in level i - 1."""
    contexts: torch.Tensor
    """(contexts, width - 1) long: the distinct values' tokens but the last, right-padded with 0."""
    rows: torch.Tensor
    """(values,) long: each value's row in `contexts`."""

    @classmethod
    def from_ids(cls, ids: list[list[int]]) -> CandidateValues:
        """Arrange `ids` (one non-empty token list per value, no list a prefix of another)."""
        whole = [tuple(sequence) for sequence in ids]
        proper_prefixes = {sequence[:end] for sequence in whole for end in range(len(sequence))}
        if not all(whole) or len(set(whole)) < len(whole) or set(whole) & proper_prefixes:
            raise ValueError("candidate token ids must be non-empty, distinct and prefix-free")
        width = max(len(sequence) for sequence in whole)
        levels: list[dict[tuple[int, ...], int]] = [{} for _ in range(width)]  # prefix -> index, per level
        tokens = torch.zeros(len(whole), width, dtype=torch.long)
        nodes = torch.zeros(len(whole), width, dtype=torch.long)
        for index, sequence in enumerate(whole):
            tokens[index, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            nodes[index, : len(sequence)] = torch.tensor(
                [levels[end].setdefault(sequence[:end], len(levels[end])) for end in range(len(sequence))]
            )
        lengths = torch.tensor([len(sequence) for sequence in whole])
        context_rows = {context: row for row, context in enumerate(dict.fromkeys(seq[:-1] for seq in whole))}
        contexts = torch.zeros(len(context_rows), width - 1, dtype=torch.long)
        for context, row in context_rows.items():
            contexts[row, : len(context)] = torch.tensor(context, dtype=torch.long)
        return cls(
            tuple(whole), tokens, torch.arange(width) < lengths[:, None], nodes,
            tuple(torch.tensor(list(levels[end]), dtype=torch.long) for end in range(1, width)),
            tuple(torch.tensor([levels[end - 1][prefix[:-1]] for prefix in levels[end]]) for end in range(1, width)),
            contexts, torch.tensor([context_rows[sequence[:-1]] for sequence in whole]),
        )

    def index(self, answer: list[int]) -> int:
        """Position of the value whose token ids are `answer`; ValueError if none is."""
        try:
            return self.ids.index(tuple(answer))
        except ValueError:
            raise ValueError(f"the answer {answer} is none of the candidate values") from None


def candidate_values(
    tokenizer: PreTrainedTokenizerBase, attributes: Iterable[str] = ATTRIBUTES
) -> dict[str, CandidateValues]:
    """Each attribute's value set, ``" " + v`` tokenized as `tokenize_probe` tokenizes answers.

    Raises:
        ValueError: if two values share their token ids, or one's ids are a prefix of another's
            (the sequence scores would then not be probabilities of disjoint continuations).
    """
    candidates = {}
    for attribute in attributes:
        ids = tokenizer([" " + value for value in value_choices(attribute)], add_special_tokens=False)["input_ids"]
        try:
            candidates[attribute] = CandidateValues.from_ids(ids)
        except ValueError:
            raise ValueError(f"the tokens of the {attribute} values are not prefix-free under this tokenizer") from None
    return candidates


_VALUES_OF_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_values(tokenizer: PreTrainedTokenizerBase) -> dict[str, CandidateValues]:
    """`candidate_values` of every attribute, built once per tokenizer object (the 16 800 dates
    take about 1 s) and kept while the tokenizer lives."""
    if tokenizer not in _VALUES_OF_TOKENIZER:
        _VALUES_OF_TOKENIZER[tokenizer] = candidate_values(tokenizer)
    return _VALUES_OF_TOKENIZER[tokenizer]


def _tree_log_probs(
    model: nn.Module, prompt: list[int], values: CandidateValues, batch_size: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(level, first node, (nodes, vocab) float32): log p(next token | prompt + node prefix) for
    every node, level by level, `batch_size` nodes per forward.

    A model with a KV cache (``new_cache``, like `MidusLM`) feeds each node's last token only, after
    its parent's cached keys (the prompt read once); another model reads prompt + prefix whole.
    """
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([prompt], device=device)
    cached = hasattr(model, "new_cache")
    cache = model.new_cache(1, len(prompt)) if cached else None
    logits = model(prompt_ids, cache, 0) if cached else model(prompt_ids)
    yield 0, 0, torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
    for level, (prefixes, parents) in enumerate(zip(values.prefixes, values.parents), start=1):
        length = len(prompt) + level  # positions once this level's token is read
        # The next level reads this level's keys: one cache for the level, written chunk by chunk.
        level_cache = model.new_cache(len(parents), length) if cached and len(parents) > batch_size else None
        for first in range(0, len(parents), batch_size):
            chunk = slice(first, first + batch_size)
            if cached:
                chunk_cache = model.new_cache(len(parents[chunk]), length)
                chunk_cache.copy_prefix_from(cache, parents[chunk].to(device), length - 1)
                logits = model(prefixes[chunk, -1:].to(device), chunk_cache, length - 1)
                if level_cache is None:
                    level_cache = chunk_cache
                else:
                    level_cache.copy_rows_from(chunk_cache, chunk)
            else:
                ids = torch.cat((prompt_ids.expand(len(prefixes[chunk]), -1), prefixes[chunk].to(device)), dim=1)
                logits = model(ids)
            yield level, first, torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
        cache = level_cache


_FEW_CONTEXTS = 64
"""Value sets with at most this many contexts are scored in one forward of prompt + context rows:
fewer operations than one forward per tree level (a small model's time is mostly per operation)."""


def _one_forward_log_likelihoods(model: nn.Module, prompt: list[int], values: CandidateValues) -> torch.Tensor:
    """`candidate_log_likelihoods` in one forward of prompt + context per row, right-padded (a
    causal model's padding never reaches the positions read: those of the row's own tokens)."""
    device = next(model.parameters()).device
    ids = torch.cat((torch.tensor([prompt]).expand(len(values.contexts), -1), values.contexts), dim=1)
    log_probs = torch.log_softmax(model(ids.to(device))[:, len(prompt) - 1 :].float(), dim=-1).cpu()
    picked = log_probs[values.rows[:, None], torch.arange(values.tokens.shape[1]), values.tokens]
    return torch.where(values.scored, picked.double(), 0.0).sum(dim=1)  # masked, not multiplied: -inf stays out


@torch.no_grad()
def candidate_log_likelihoods(
    model: nn.Module, prompt: list[int], values: CandidateValues, batch_size: int = 512
) -> torch.Tensor:
    """(values,) float64: each value's log-likelihood after `prompt`, summed over its tokens.

    `model(ids)` returns logits (batch, time, vocab) of a causal LM (`model(ids, cache, start)`
    with a `KVCache` where it has ``new_cache``); `batch_size` prefix-tree nodes per forward. A
    small value set is scored in one forward instead (`_FEW_CONTEXTS`).
    """
    if len(values.contexts) <= _FEW_CONTEXTS:
        return _one_forward_log_likelihoods(model, prompt, values)
    scores = torch.zeros(len(values.ids), dtype=torch.float64)
    for level, first, log_probs in _tree_log_probs(model, prompt, values, batch_size):
        node = values.nodes[:, level]
        mine = values.scored[:, level] & (node >= first) & (node < first + len(log_probs))
        scores[mine] += log_probs[node[mine] - first, values.tokens[mine, level]].double()
    return scores


def fact_bits(log_likelihoods: torch.Tensor, true_index: int) -> float:
    """log2|V| + log2 q(v*): q the softmax of the candidates' log-likelihoods, v* at `true_index`."""
    log_q = torch.log_softmax(log_likelihoods.double(), dim=0)[true_index]
    return (math.log(len(log_likelihoods)) + float(log_q)) / math.log(2)


def bits_by_attribute(
    model: nn.Module,
    questions: list[TokenizedQuestion],
    candidates: dict[str, CandidateValues],
    batch_size: int = 512,
) -> dict[str, float]:
    """Unclipped fact bits summed per attribute over `questions` (attributes in question order).

    `candidates`: each attribute's value set (`candidate_values`); every answer must be in it.
    """
    totals: dict[str, float] = {}
    for question in questions:
        values = candidates[question.attribute]
        scores = candidate_log_likelihoods(model, question.prompt, values, batch_size)
        bits = fact_bits(scores, values.index(question.answer))
        totals[question.attribute] = totals.get(question.attribute, 0.0) + bits
    return totals


def people_sample(
    questions: list[TokenizedQuestion], people: int, multiple_of: int = 1
) -> tuple[list[list[TokenizedQuestion]], float]:
    """The first `people` people's questions (rounded down to a multiple of `multiple_of`), one
    list per person, and the scale from the sample to the population: its people / the sample's.

    `questions` is a population's probe: person-major, one question per attribute per person
    (`BiographyCorpus.recall_probe`). Whole people are sampled, so every attribute keeps its share.
    """
    per_person = len(dict.fromkeys(question.attribute for question in questions))
    if not questions or len(questions) % per_person:
        raise ValueError(f"{len(questions)} questions are not {per_person} per person")
    everyone = [questions[first : first + per_person] for first in range(0, len(questions), per_person)]
    sample = everyone[: max(people, 0)]
    sample = sample[: len(sample) - len(sample) % multiple_of]
    return sample, (len(everyone) / len(sample) if sample else 0.0)


def clipped_bits(summed_bits: float, scale: float = 1.0) -> float:
    """max(0, `scale` x `summed_bits`): one attribute's bits in a population from its sample's sum."""
    return max(0.0, scale * summed_bits)


def share_bits(
    model: nn.Module,
    questions: list[TokenizedQuestion],
    people: int,
    candidates: dict[str, CandidateValues],
    processes: int = 1,
    rank: int = 0,
    equal_shares: bool = False,
) -> tuple[dict[str, float], float]:
    """One process's part of a population's bits: unclipped sums per attribute over its share of
    the first `people` people (every `processes`-th person from `rank`), and the population scale.

    Every attribute of the sample is a key, in the same order on every process (0.0 where the
    share holds none), so the sums can be added across processes; `equal_shares` rounds the
    sample down to a multiple of `processes` (FSDP, whose forwards are collective).
    """
    sample, scale = people_sample(questions, people, processes if equal_shares else 1)
    mine = [question for person in sample[rank::processes] for question in person]
    summed = bits_by_attribute(model, mine, candidates)
    attributes = dict.fromkeys(question.attribute for person in sample for question in person)
    return {attribute: summed.get(attribute, 0.0) for attribute in attributes}, scale


def knowledge_bits_metrics(
    model: nn.Module, questions_by_phrasing: dict[str, list[TokenizedQuestion]], tokenizer: PreTrainedTokenizerBase,
    people: int, processes: Processes,
) -> dict[str, torch.Tensor]:
    """``val/knowledge_bits[_replay]`` and per attribute ``…/<attribute>``: bits of the facts stored, per
    population (asked in the phrasing seen in training), from the first `people` people of each.

    Each process scores every world_size-th sampled person (with collective forwards, as many as every
    other process); the per-attribute sums are summed over the processes, then scaled and clipped.
    """
    populations = {
        name: questions_by_phrasing[phrasing]
        for phrasing, name in (("train", "val/knowledge_bits"), ("replay", "val/knowledge_bits_replay"))
        if questions_by_phrasing.get(phrasing)
    }
    if people <= 0 or not populations:
        return {}
    values = tokenizer_values(tokenizer)
    keys, sums = [], []  # per (population, attribute), in the same order on every process
    for name, questions in populations.items():
        summed, scale = share_bits(
            model, questions, people, values, processes.world_size, processes.rank,
            equal_shares=processes.collective_forwards,
        )
        keys += [(name, attribute, scale) for attribute in summed]
        sums += summed.values()
    if not keys:
        return {}
    totals = processes.sum(torch.tensor(sums, device=processes.device)).tolist()
    bits = [(name, attribute, clipped_bits(total, scale)) for (name, attribute, scale), total in zip(keys, totals)]
    metrics = {f"{name}/{attribute}": value for name, attribute, value in bits}
    for name in dict.fromkeys(name for name, _, _ in bits):
        metrics[name] = sum(value for population, _, value in bits if population == name)
    return {name: torch.tensor(value, device=processes.device) for name, value in metrics.items()}
