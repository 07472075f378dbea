"""Tests for the embedded biography corpus (midus.data.corpus)."""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict

import pytest

from midus.data.corpus import (
    ATTRIBUTES,
    BiographyCorpus,
    Person,
    RecallItem,
    generate_population,
    value_choices,
)
from midus.data.corpus.names import NAME_SPACE_SIZE, name_from_index, pronoun_for
from midus.data.corpus.templates import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    probe_prefix,
    probe_templates,
    render,
)


@pytest.fixture(scope="module")
def corpus() -> BiographyCorpus:
    return BiographyCorpus(seed=0, num_people=120, docs_per_person=4)


def _docs_of(docs: list[str], name: str) -> list[str]:
    return [d for d in docs if name in d]


# --- population -------------------------------------------------------------------


def test_name_space_is_large_and_bijective() -> None:
    assert NAME_SPACE_SIZE >= 10**6
    sample = [name_from_index(i) for i in range(0, NAME_SPACE_SIZE, NAME_SPACE_SIZE // 5000)]
    assert len(set(sample)) == len(sample)
    for name in sample[:50]:
        first, last = name.split(" ")
        assert first.isalpha() and last.isalpha() and first.istitle() and last.istitle()
        assert pronoun_for(name) in ("She", "He")
    with pytest.raises(ValueError, match="index"):
        name_from_index(NAME_SPACE_SIZE)


def test_population_deterministic_unique_and_disjoint_across_seeds() -> None:
    a0, b0 = generate_population(0, 500), generate_population(0, 500)
    assert a0 == b0
    names0 = [p.name for p in a0]
    assert len(set(names0)) == 500
    names1 = {p.name for p in generate_population(1, 500)}
    assert not names1 & set(names0)
    for p in a0[:20]:
        assert isinstance(p, Person)
        assert set(p.attributes) == set(ATTRIBUTES)
        for attr, value in p.attributes.items():
            assert value in value_choices(attr)


def test_population_size_errors_name_size() -> None:
    for bad in (0, -3, NAME_SPACE_SIZE + 1):
        with pytest.raises(ValueError, match="size"):
            generate_population(0, bad)
    with pytest.raises(ValueError, match="attribute"):
        value_choices("shoe_size")


def test_attribute_values_are_well_formed() -> None:
    assert 5 <= len(ATTRIBUTES) <= 7
    for attr in ATTRIBUTES:
        values = value_choices(attr)
        assert len(set(values)) == len(values)
        if attr != "birth_date":
            assert 20 <= len(values) <= 60
        for v in values:
            assert v and v[0] not in string.punctuation and not v[0].isspace()
        # No value is a prefix of another at a word boundary ("New" vs "New Haven").
        value_set = set(values)
        for v in values:
            words = v.split(" ")
            for k in range(1, len(words)):
                assert " ".join(words[:k]) not in value_set
    assert "12 March 1987" in value_choices("birth_date")


def test_attributes_are_independent_of_name() -> None:
    people = generate_population(3, 2000)
    for attr in ATTRIBUTES:
        counts = Counter(p.attributes[attr] for p in people)
        if attr == "birth_date":
            # Each date component should be well covered.
            for pos, n_choices in ((0, 28), (1, 12), (2, 50)):
                seen = {p.attributes[attr].split(" ")[pos] for p in people}
                assert len(seen) >= 0.9 * n_choices
        else:
            assert len(counts) >= 0.9 * len(value_choices(attr))
            # Roughly uniform: no value takes more than 3x its fair share.
            assert max(counts.values()) <= 3 * len(people) / len(value_choices(attr))
        # Within a group of people sharing a name feature, values still vary,
        # i.e. the value is not a function of the name.
        by_initial: dict[str, set[str]] = defaultdict(set)
        for p in people:
            by_initial[p.name[0]].add(p.attributes[attr])
        assert all(len(vals) > 1 for vals in by_initial.values())


# --- templates --------------------------------------------------------------------


def _words(template: str) -> set[str]:
    return set(re.findall(r"[a-z]+", template.replace("{name}", "").replace("{value}", "").lower()))


def test_template_families_satisfy_probe_and_heldout_rules() -> None:
    train_middles = [t for ts in TRAIN_TEMPLATES.values() for t in ts]
    train_words = set().union(*(_words(t) for t in train_middles))
    for attr in ATTRIBUTES:
        assert len(TRAIN_TEMPLATES[attr]) >= 4 and len(HELDOUT_TEMPLATES[attr]) >= 2
        assert len(probe_templates(TRAIN_TEMPLATES, attr)) >= 2
        assert len(probe_templates(HELDOUT_TEMPLATES, attr)) >= 2
        assert not set(TRAIN_TEMPLATES[attr]) & set(HELDOUT_TEMPLATES[attr])
        for t in HELDOUT_TEMPLATES[attr]:
            assert t.startswith(("{name} ", "{name}'s "))
            # New structure, known words: held-out loss must not be dominated by unseen vocabulary.
            assert _words(t) <= train_words, _words(t) - train_words
            middle = t[len("{name}"): t.index("{value}")]
            assert not any(middle in tt for tt in train_middles), middle
        for t in TRAIN_TEMPLATES[attr] + HELDOUT_TEMPLATES[attr]:
            assert t.count("{name}") == 1 and t.count("{value}") == 1
            if t.startswith("{value}"):
                assert all(v[0].isupper() for v in value_choices(attr))
    assert probe_prefix("{name} was born in {value}.") == "{name} was born in"
    assert probe_prefix("{value} hired {name}.") is None
    assert render("{name} likes {value}.", "She", "chess") == "She likes chess."


# --- corpus -----------------------------------------------------------------------


def test_corpus_is_deterministic_and_seed_dependent(corpus: BiographyCorpus) -> None:
    again = BiographyCorpus(seed=0, num_people=120, docs_per_person=4)
    assert again.train_documents() == corpus.train_documents()
    assert again.validation_documents() == corpus.validation_documents()
    assert again.recall_probe() == corpus.recall_probe()
    other = BiographyCorpus(seed=1, num_people=120, docs_per_person=4)
    assert {p.name for p in other.people}.isdisjoint(p.name for p in corpus.people)
    assert other.train_documents() != corpus.train_documents()


def test_train_documents_cover_every_fact(corpus: BiographyCorpus) -> None:
    train = corpus.train_documents()
    assert len(train) == 120 * 4
    for person in corpus.people:
        docs = _docs_of(train, person.name)
        assert len(docs) == 4
        for doc in docs:
            # Each document states every fact exactly once, one sentence per fact.
            assert doc.count(".") == len(ATTRIBUTES) and doc.endswith(".")
            for value in person.attributes.values():
                assert value in doc
    # Documents are shuffled: not grouped by person.
    first_names = [next(p.name for p in corpus.people if p.name in d) for d in train[:8]]
    assert len(set(first_names)) > 2


def test_train_documents_per_person_are_nested_subsets(corpus: BiographyCorpus) -> None:
    full = corpus.train_documents()
    assert corpus.train_documents([4] * 120) == full
    counts = [k % 5 for k in range(120)]
    subset = corpus.train_documents(counts)
    assert subset == [doc for doc in full if doc in set(subset)]  # training order kept
    assert [len(_docs_of(subset, p.name)) for p in corpus.people] == counts
    firsts = corpus.train_documents([1] * 120)
    assert set(firsts) <= set(corpus.train_documents([2] * 120)) <= set(full)
    # A person's first rendering states every fact in a probe-able phrasing (the "train" probe's).
    for person in corpus.people[:20]:
        (doc,) = _docs_of(firsts, person.name)
        for attr in ATTRIBUTES:
            assert any(
                render(t, subject, person.attributes[attr]) in doc
                for t in probe_templates(TRAIN_TEMPLATES, attr)
                for subject in (person.name, pronoun_for(person.name))
            )
    for bad in ([4] * 119, [5] + [4] * 119, [-1] + [4] * 119):
        with pytest.raises(ValueError, match="per_person must hold 120 counts in"):
            corpus.train_documents(bad)


def test_heldout_sentences_never_in_training(corpus: BiographyCorpus) -> None:
    train_text = "\n".join(corpus.train_documents())
    for person in corpus.people:
        for attr in ATTRIBUTES:
            for t in HELDOUT_TEMPLATES[attr]:
                for subject in (person.name, pronoun_for(person.name)):
                    sentence = render(t, subject, person.attributes[attr])
                    assert sentence not in train_text
    val = corpus.validation_documents()
    assert len(val) == len(corpus.people)
    for person, doc in zip(corpus.people, val):
        assert person.name in doc
        for value in person.attributes.values():
            assert value in doc


@pytest.mark.parametrize("family", ["heldout", "train"])
def test_recall_probe_prompts_are_sentence_prefixes(family: str) -> None:
    c = BiographyCorpus(seed=5, num_people=60, docs_per_person=3, probe_templates=family)
    items = c.recall_probe()
    assert len(items) == 60 * len(ATTRIBUTES)
    templates = HELDOUT_TEMPLATES if family == "heldout" else TRAIN_TEMPLATES
    by_name = {p.name: p for p in c.people}
    train = c.train_documents()
    for item in items:
        assert isinstance(item, RecallItem)
        person = by_name[item.person]
        assert item.answer == person.attributes[item.attribute]
        assert item.prompt.startswith(person.name) and not item.prompt.endswith(" ")
        target = item.prompt + " " + item.answer
        sentences = [render(t, person.name, item.answer) for t in templates[item.attribute]]
        assert any(s.startswith(target) for s in sentences)
        if family == "train":
            # The phrasing was seen for this very fact (possibly with a pronoun).
            tail = target[len(person.name):]
            assert any(tail in d for d in _docs_of(train, person.name))
    assert c.recall_probe() == items
    chance = c.chance_accuracy()
    # Every person is asked every attribute once: the mean over attributes of 1 / (values), about
    # 1/30 for all but the birth date (near impossible to guess), so about 0.03 overall.
    per_attribute = [1 / len(value_choices(attribute)) for attribute in ATTRIBUTES]
    assert chance == pytest.approx(sum(per_attribute) / len(ATTRIBUTES), rel=1e-12)
    assert 0.02 < chance < 0.04


def test_corpus_argument_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="num_people must be >= 1"):
        BiographyCorpus(num_people=0)
    with pytest.raises(ValueError, match="docs_per_person"):
        BiographyCorpus(docs_per_person=0)
    with pytest.raises(ValueError, match="probe_templates"):
        BiographyCorpus(probe_templates="test")
    with pytest.raises(ValueError, match="seed"):
        BiographyCorpus(seed="0")  # type: ignore[arg-type]
