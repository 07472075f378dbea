"""Knowledge bits (`midus.probes.knowledge_bits`): known answers from models whose beliefs are set by hand,
the batched scores against a plain per-candidate computation, and the metric and summary of a real fit."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from midus.data.corpus import ATTRIBUTES, value_choices
from midus.data.recall_probe import TokenizedQuestion
from midus.model import MidusLM, ModelConfig
from midus.probes import ProbeConfig
from midus.probes.knowledge_bits import (
    CandidateValues,
    bits_by_attribute,
    candidate_log_likelihoods,
    candidate_values,
    fact_bits,
    people_sample,
    share_bits,
)
from midus.training import CausalLM
from midus.training.run_summary import RunSummary

PEOPLE = 2  # people of the tiny corpus scored by the known-answer tests


class AnswerBeliefLM(torch.nn.Module):
    """A causal LM that, after each known prompt, continues with answer token sequences drawn from a
    fixed distribution (``beliefs[prompt] = {answer ids: probability}``); uniform logits elsewhere.

    Its next-token probability after prompt + partial answer a is mass(a + token) / mass(a), so a
    whole answer's sequence probability is exactly its belief. No KV cache: full forwards.
    """

    def __init__(self, beliefs: dict[tuple[int, ...], dict[tuple[int, ...], float]], vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for the scorer
        self.next_mass: dict[tuple[int, ...], dict[tuple[int, ...], dict[int, float]]] = {}
        self.rows: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor | None] = {}
        for prompt, answers in beliefs.items():
            table: dict[tuple[int, ...], dict[int, float]] = defaultdict(lambda: defaultdict(float))
            for answer, probability in answers.items():
                for end in range(len(answer) if probability > 0 else 0):
                    table[answer[:end]][answer[end]] += probability
            self.next_mass[prompt] = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        for row, sequence in enumerate(ids.tolist()):
            prompt = next((p for p in self.next_mass if tuple(sequence[: len(p)]) == p), None)
            if prompt is None:
                continue  # not a question (validation text): uniform
            for position in range(len(prompt) - 1, len(sequence)):
                next_logits = self._next_logits(prompt, tuple(sequence[len(prompt) : position + 1]))
                if next_logits is not None:
                    logits[row, position] = next_logits
        return logits

    def _next_logits(self, prompt: tuple[int, ...], partial: tuple[int, ...]) -> torch.Tensor | None:
        """Log of each next token's share of the mass below prompt + partial answer (-inf: none)."""
        key = (prompt, partial)
        if key not in self.rows:
            masses = self.next_mass[prompt].get(partial)
            self.rows[key] = None
            if masses:
                self.rows[key] = torch.full((self.vocab,), -math.inf)
                self.rows[key][list(masses)] = torch.tensor([math.log(mass) for mass in masses.values()])
        return self.rows[key]


@pytest.fixture(scope="module")
def probe(tiny_data) -> tuple[list[TokenizedQuestion], dict[str, CandidateValues]]:
    """The first PEOPLE people's questions (phrasing seen in training) and the tiny BPE's value sets."""
    sample, _ = people_sample(tiny_data.recall_questions["train"], PEOPLE)
    return [question for person in sample for question in person], candidate_values(tiny_data.tokenizer)


def beliefs_of(questions, candidates, share_of_truth: float, wrong_offset: int = 1):
    """Per prompt: `share_of_truth` on the true value, the rest on the value `wrong_offset` places after it."""
    beliefs = {}
    for question in questions:
        values = candidates[question.attribute]
        true = values.index(question.answer)
        wrong = values.ids[(true + wrong_offset) % len(values.ids)]
        beliefs[tuple(question.prompt)] = {tuple(question.answer): share_of_truth, wrong: 1.0 - share_of_truth}
    return beliefs


def full_bits(attribute: str) -> float:
    return math.log2(len(value_choices(attribute)))


def test_a_model_that_knows_every_fact_holds_all_their_bits(probe, tiny_data) -> None:
    questions, candidates = probe
    oracle = AnswerBeliefLM(beliefs_of(questions, candidates, 1.0), tiny_data.vocab_size)
    bits = bits_by_attribute(oracle, questions, candidates, batch_size=300)  # several batches of dates
    assert list(bits) == list(ATTRIBUTES)
    for attribute in ATTRIBUTES:
        assert bits[attribute] == pytest.approx(PEOPLE * full_bits(attribute), rel=1e-12)
    # Scaled from the people scored to all 30: 30 x 37.3 bits.
    summed, scale = share_bits(oracle, tiny_data.recall_questions["train"], PEOPLE, candidates)
    assert scale == 30 / PEOPLE
    assert sum(scale * bits for bits in summed.values()) == pytest.approx(30 * sum(map(full_bits, ATTRIBUTES)))
    assert sum(map(full_bits, ATTRIBUTES)) == pytest.approx(37.28, abs=0.01)


def test_a_model_uniform_over_the_values_holds_no_bits(probe, tiny_data) -> None:
    questions, candidates = probe
    uniform = {
        tuple(q.prompt): {ids: 1 / len(candidates[q.attribute].ids) for ids in candidates[q.attribute].ids}
        for q in questions
    }
    bits = bits_by_attribute(AnswerBeliefLM(uniform, tiny_data.vocab_size), questions, candidates)
    assert bits == pytest.approx(dict.fromkeys(ATTRIBUTES, 0.0), abs=1e-5)  # float32 log-probabilities


def test_constant_logits_hold_no_bits_when_the_values_are_equally_long() -> None:
    class Constant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, 9)

    values = CandidateValues.from_ids([[1, 5], [2, 5], [3, 6], [4, 6]])
    scores = candidate_log_likelihoods(Constant(), [0, 7], values)
    assert scores.tolist() == pytest.approx([2 * -math.log(9)] * 4)
    assert fact_bits(scores, values.index([3, 6])) == pytest.approx(0.0, abs=1e-12)


def test_probability_on_a_wrong_value_costs_bits(probe, tiny_data) -> None:
    questions, candidates = probe
    halves = AnswerBeliefLM(beliefs_of(questions, candidates, 0.5), tiny_data.vocab_size)
    bits = bits_by_attribute(halves, questions, candidates)
    # Half the mass on a wrong value: one bit of every fact missing.
    for attribute in ATTRIBUTES:
        assert bits[attribute] == pytest.approx(PEOPLE * (full_bits(attribute) - 1), rel=1e-9)
    confidently_wrong = AnswerBeliefLM(beliefs_of(questions, candidates, 0.01), tiny_data.vocab_size)
    wrong = bits_by_attribute(confidently_wrong, questions, candidates)
    # Below chance (0.01 < 1/24): negative before the clip, the information a sum of them bounds.
    assert all(wrong[attribute] < 0 for attribute in ATTRIBUTES if attribute != "birth_date")


def test_batched_scores_equal_one_forward_per_candidate(tiny_data, probe) -> None:
    torch.manual_seed(0)
    model = MidusLM(ModelConfig(vocab_size=tiny_data.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2))
    model.eval()

    def one_by_one(prompt: list[int], answer: tuple[int, ...]) -> float:
        log_probs = torch.log_softmax(model(torch.tensor([prompt + list(answer)]))[0, len(prompt) - 1 : -1], dim=-1)
        return float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].sum())

    questions, candidates = probe
    date, city = questions[0], questions[1]
    # Dates: the prefix tree with the KV cache, its widest levels in chunks of 200 nodes.
    dates = candidates["birth_date"]
    assert len(dates.contexts) > 64 and max(len(parents) for parents in dates.parents) > 200
    scores = candidate_log_likelihoods(model, date.prompt, dates, batch_size=200)
    with torch.no_grad():
        for index in [dates.index(date.answer), *range(0, 16800, 1051)]:
            assert float(scores[index]) == pytest.approx(one_by_one(date.prompt, dates.ids[index]), abs=1e-4)
        # Cities: one right-padded forward of prompt + context per row (values of 1 to several tokens).
        cities = candidates["birth_city"]
        scores = candidate_log_likelihoods(model, city.prompt, cities)
        assert len({len(ids) for ids in cities.ids}) > 1
        for index, answer in enumerate(cities.ids):
            assert float(scores[index]) == pytest.approx(one_by_one(city.prompt, answer), abs=1e-4)


def test_value_sets_must_be_prefix_free_and_samples_are_whole_people(tiny_data) -> None:
    with pytest.raises(ValueError, match="prefix-free"):
        CandidateValues.from_ids([[1], [1, 2]])
    questions = tiny_data.recall_questions["train"]
    sample, scale = people_sample(questions, 7, multiple_of=2)  # 6 of 30 people
    assert len(sample) == 6 and scale == 5.0
    assert all([q.attribute for q in person] == list(ATTRIBUTES) for person in sample)
    assert sum(sample, []) == questions[: 6 * len(ATTRIBUTES)]


@pytest.fixture(scope="module")
def replay_data(tiny_cache: Path):
    """12 new people trained beside a replay population of 12 old ones (BPE of 300, blocks of 32)."""
    from midus.data.datamodule import EmbeddedCorpusConfig, LanguageModelingData

    return LanguageModelingData(
        embedded=EmbeddedCorpusConfig(seed=0, num_people=12, docs_per_person=2, replay_seed=1, replay_share=0.4),
        bpe_vocab_size=300, block_size=32, batch_size=8, cache_dir=str(tiny_cache),
    )


def quiet_trainer(tmp_path: Path, **options) -> pl.Trainer:
    return pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=2, default_root_dir=str(tmp_path), **options,
    )


def tiny_module(vocab_size: int) -> CausalLM:
    config = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    return CausalLM(config, probes=ProbeConfig(recall_questions=0, knowledge_bits_people=1, memory_zeroed=False))


def test_a_fit_logs_knowledge_bits_of_both_populations_and_summarises_them(tmp_path: Path, replay_data) -> None:
    pl.seed_everything(0)
    module = tiny_module(replay_data.vocab_size)
    trainer = quiet_trainer(
        tmp_path, max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[RunSummary()],
    )
    trainer.fit(module, replay_data)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    candidates = candidate_values(replay_data.tokenizer)
    for name, phrasing in (("val/knowledge_bits", "train"), ("val/knowledge_bits_replay", "replay")):
        # The first person of the population in the phrasing seen in training, scaled to its 12.
        summed, scale = share_bits(module.model.eval(), replay_data.recall_questions[phrasing], 1, candidates)
        assert scale == 12
        for attribute in ATTRIBUTES:
            assert metrics[f"{name}/{attribute}"] == pytest.approx(max(0.0, scale * summed[attribute]), abs=1e-4)
        assert metrics[name] == pytest.approx(sum(metrics[f"{name}/{attribute}"] for attribute in ATTRIBUTES))
    record = json.loads((tmp_path / "summary.json").read_text())["knowledge_bits"]
    assert record["bits"] == pytest.approx(metrics["val/knowledge_bits"])
    assert record["bits_replay"] == pytest.approx(metrics["val/knowledge_bits_replay"])
    assert record["bits_per_param"] == pytest.approx(record["bits"] / module.model.num_parameters())
    assert record["bits_per_added_param"] is None  # nothing up-scaled


def test_validating_a_model_that_knows_the_scored_people_counts_both_populations_in_full(
    tmp_path: Path, replay_data
) -> None:
    module = tiny_module(replay_data.vocab_size)
    candidates = candidate_values(replay_data.tokenizer)
    scored = [question for phrasing in ("train", "replay") for question in replay_data.recall_questions[phrasing][:6]]
    module.model = AnswerBeliefLM(beliefs_of(scored, candidates, 1.0), replay_data.vocab_size)
    metrics = quiet_trainer(tmp_path).validate(module, replay_data, verbose=False)[0]
    # One person of each population known in full stands for all 12 of it.
    assert metrics["val/knowledge_bits"] == pytest.approx(12 * sum(map(full_bits, ATTRIBUTES)), rel=1e-6)
    assert metrics["val/knowledge_bits_replay"] == pytest.approx(12 * sum(map(full_bits, ATTRIBUTES)), rel=1e-6)
    assert metrics["val/knowledge_bits/hobby"] == pytest.approx(12 * full_bits("hobby"), rel=1e-6)
