"""Biography documents, held-out validation text and the knowledge-recall probe."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from midus.data.corpus.names import NAME_SPACE_SIZE, pronoun_for
from midus.data.corpus.population import ATTRIBUTES, Person, generate_population, value_choices
from midus.data.corpus.templates import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    allows_pronoun,
    probe_prefix,
    render,
)
from midus.data.corpus.templates import (
    probe_templates as probe_capable,
)

_PROBE_FAMILIES = ("heldout", "train")


@dataclass(frozen=True)
class RecallItem:
    """One knowledge-recall question: complete ``prompt`` with ``" " + answer``."""

    person: str
    attribute: str
    prompt: str
    answer: str


class BiographyCorpus:
    """The kit's embedded default corpus: biographies of a fictional population.

    ``num_people`` fictional people (see :func:`generate_population`) each have
    one value per attribute in :data:`ATTRIBUTES`. Training text holds
    ``docs_per_person`` biographies per person; each renders all of the
    person's facts with randomly chosen TRAIN templates in shuffled order (the
    first sentence uses the full name, later ones the name or a pronoun), and
    the documents are shuffled. Validation text is one biography per person
    rendered only with HELD-OUT templates, i.e. the same facts in phrasing never
    seen in training, so it measures stored knowledge, not memorised sentences.

    :meth:`recall_probe` gives one prompt per person and attribute (e.g.
    ``"Tavo Merin was born in"``) whose greedy completion should be the value.
    With ``probe_templates="heldout"`` prompts use held-out phrasing; with
    ``"train"`` they reuse a phrasing that occurred for that person's fact in
    training (a memorisation sanity check).

    Everything is a pure function of the constructor arguments: the same seed
    gives byte-identical text and probes in any process.
    """

    def __init__(
        self,
        seed: int = 0,
        num_people: int = 400,
        docs_per_person: int = 4,
        probe_templates: str = "heldout",
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(num_people, int) or not 1 <= num_people <= NAME_SPACE_SIZE:
            raise ValueError(f"num_people must be >= 1 and <= {NAME_SPACE_SIZE}, got {num_people}")
        if not isinstance(docs_per_person, int) or docs_per_person < 1:
            raise ValueError(f"docs_per_person must be >= 1, got {docs_per_person}")
        if probe_templates not in _PROBE_FAMILIES:
            raise ValueError(f"probe_templates must be one of {_PROBE_FAMILIES}, got {probe_templates!r}")
        self.seed = seed
        self.num_people = num_people
        self.docs_per_person = docs_per_person
        self.probe_templates = probe_templates
        self.people: list[Person] = generate_population(seed, num_people)
        # Separate, namespaced streams: changing docs_per_person must not change
        # the validation text, and the probe must not depend on call order.
        self._train_plan, self._train_copies = self._plan(TRAIN_TEMPLATES, docs_per_person, "train")
        self._val_plan, _ = self._plan(HELDOUT_TEMPLATES, 1, "validation")

    def _rng(self, purpose: str) -> random.Random:
        # The seed string is part of the corpus definition (it predates the move to midus.data): keep it.
        return random.Random(f"midus.corpus.{purpose}:{self.seed}")

    def _plan(
        self, family: dict[str, tuple[str, ...]], copies: int, purpose: str
    ) -> tuple[list[list[tuple[int, str, str, bool]]], list[int]]:
        """Choose, per document, its sentences as (person index, attribute, template, use_name).

        Also returns each document's copy number (0 .. copies - 1, the order in which the
        person's renderings were drawn).
        """
        rng = self._rng(purpose)
        docs = []
        for idx in range(len(self.people)):
            for copy in range(copies):
                # The first copy states each fact with a value-final phrasing, so
                # every fact is seen in training in a probe-able form and the
                # "train" probe always reuses a phrasing seen for that fact.
                sentences = [
                    (idx, a, rng.choice(probe_capable(family, a) if copy == 0 else family[a]), True)
                    for a in ATTRIBUTES
                ]
                rng.shuffle(sentences)
                # First sentence always names the person; later ones may use a
                # pronoun so the model must link facts across sentences.
                docs.append(
                    [s if k == 0 or not allows_pronoun(s[2]) else s[:3] + (rng.random() < 0.5,)
                     for k, s in enumerate(sentences)]
                )
        order = list(range(len(docs)))
        if purpose == "train":
            # Shuffling positions applies the very permutation rng.shuffle(docs) would.
            rng.shuffle(order)
        return [docs[i] for i in order], [i % copies for i in order]

    def _render(self, doc: list[tuple[int, str, str, bool]]) -> str:
        out = []
        for idx, attribute, template, use_name in doc:
            person = self.people[idx]
            subject = person.name if use_name else pronoun_for(person.name)
            out.append(render(template, subject, person.attributes[attribute]))
        return " ".join(out)

    def train_documents(self, per_person: Sequence[int] | None = None) -> list[str]:
        """``docs_per_person`` shuffled TRAIN-template biographies per person, documents shuffled.

        ``per_person`` (one count per person, population order, each in 0..docs_per_person)
        keeps only the first ``per_person[i]`` renderings of person ``i`` in the order they
        were drawn, still in training order: a subset of the full list, whose first rendering
        states every fact in a probe-able phrasing.
        """
        if per_person is None:
            return [self._render(doc) for doc in self._train_plan]
        if len(per_person) != len(self.people) or not all(0 <= k <= self.docs_per_person for k in per_person):
            raise ValueError(
                f"per_person must hold {len(self.people)} counts in [0, {self.docs_per_person}], got {list(per_person)}"
            )
        return [
            self._render(doc)
            for doc, copy in zip(self._train_plan, self._train_copies)
            if copy < per_person[doc[0][0]]
        ]

    def validation_documents(self) -> list[str]:
        """One HELD-OUT-template biography per person, in population order."""
        return [self._render(doc) for doc in self._val_plan]

    def recall_probe(self, phrasing: str | None = None) -> list[RecallItem]:
        """One item per person x attribute (person-major, ATTRIBUTES order); deterministic.

        `phrasing` ("heldout" or "train") overrides the constructor's `probe_templates`.
        """
        phrasing = phrasing or self.probe_templates
        if phrasing not in _PROBE_FAMILIES:
            raise ValueError(f"phrasing must be one of {_PROBE_FAMILIES}, got {phrasing!r}")
        rng = self._rng(f"probe.{phrasing}")
        used: dict[tuple[int, str], set[str]] = {}
        for doc in self._train_plan:
            for idx, attribute, template, _ in doc:
                used.setdefault((idx, attribute), set()).add(template)
        family = HELDOUT_TEMPLATES if phrasing == "heldout" else TRAIN_TEMPLATES
        items = []
        for idx, person in enumerate(self.people):
            for attribute in ATTRIBUTES:
                candidates = probe_capable(family, attribute)
                if phrasing == "train":
                    # Reuse a phrasing actually seen for this fact in training
                    # (_plan guarantees at least one is probe-able).
                    candidates = tuple(t for t in candidates if t in used[(idx, attribute)])
                prefix = probe_prefix(rng.choice(candidates))
                assert prefix is not None  # guaranteed by probe_capable()
                items.append(
                    RecallItem(
                        person=person.name,
                        attribute=attribute,
                        prompt=prefix.format(name=person.name),
                        answer=person.attributes[attribute],
                    )
                )
        return items

    def chance_accuracy(self) -> float:
        """Mean over probe items of 1 / (number of candidate values): the uniform-guess baseline."""
        items = self.recall_probe()
        return sum(1.0 / len(value_choices(it.attribute)) for it in items) / len(items)
