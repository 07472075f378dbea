"""The embedded corpus as training text: biographies of one population, or of two mixed for replay.

`embedded_splits` makes the ``train`` and ``validation`` splits (one ``text`` column) of a
`BiographyCorpus`, with an optional replay population (`replay_counts`, `shared_names`);
`embedded_key` names the text in cache paths. The text is a pure function of the corpus
settings, so nothing is read from disk.
"""

from __future__ import annotations

import logging
import random

from datasets import Dataset, DatasetDict

from midus.data.corpus import BiographyCorpus

log = logging.getLogger(__name__)


def embedded_splits(
    corpus: BiographyCorpus,
    replay: BiographyCorpus | None = None,
    replay_share: float = 0.0,
    replay_validation: bool = True,
) -> DatasetDict:
    """Training biographies and held-out-template biographies of the same people.

    With a `replay` population, training text is every document of `corpus` plus a subset of
    the replay population's documents (see `replay_counts`) making `replay_share` of the mix,
    shuffled together deterministically; validation text is the held-out-template biographies
    of both populations (main first, then replay, one per person), so ``val/loss`` covers both;
    with ``replay_validation=False`` the main population's alone.
    People of `corpus` whose name also occurs in `replay` are left out of the main population
    (see `shared_names`).
    """
    if replay is None:
        return DatasetDict(
            train=Dataset.from_dict({"text": corpus.train_documents()}),
            validation=Dataset.from_dict({"text": corpus.validation_documents()}),
        )
    shared = shared_names(corpus, replay)
    kept = [person.name not in shared for person in corpus.people]
    main_train = corpus.train_documents([corpus.docs_per_person if keep else 0 for keep in kept])
    counts = replay_counts(len(replay.people), len(main_train), replay.docs_per_person, replay_share)
    replay_train = replay.train_documents(counts)
    train = main_train + replay_train
    mix = (corpus.seed, len(corpus.people), corpus.docs_per_person, replay.seed, len(replay.people), replay_share)
    if replay.docs_per_person != corpus.docs_per_person:  # only then: every earlier mix keeps its order
        mix += (replay.docs_per_person,)
    random.Random(f"midus.text.replay_mix:{mix}").shuffle(train)
    validation = [doc for doc, keep in zip(corpus.validation_documents(), kept) if keep]
    log.info(
        "embedded corpus: %d documents of population %d and %d of replay population %d (share %.4f)",
        len(main_train), corpus.seed, len(replay_train), replay.seed, len(replay_train) / len(train),
    )
    return DatasetDict(
        train=Dataset.from_dict({"text": train}),
        validation=Dataset.from_dict(
            {"text": validation + (replay.validation_documents() if replay_validation else [])}
        ),
    )


def shared_names(corpus: BiographyCorpus, replay: BiographyCorpus) -> set[str]:
    """Names of people in both populations.

    Different seeds share a name only by chance (about n_main * n_replay / 2.4e8 names are
    expected to collide, e.g. 1.7e-4 for 200 x 200). Such people are dropped from the MAIN
    population, deterministically: the replay population stays exactly the one a base model
    was trained on, and the main population holds only people that are new to it.
    """
    return {person.name for person in corpus.people} & {person.name for person in replay.people}


def replay_counts(replay_people: int, main_documents: int, docs_per_person: int, share: float) -> list[int]:
    """Training documents per replay person (population order) so replay is `share` of the mix.

    ``R = round(share / (1 - share) * main_documents)`` replay documents, spread evenly: each
    person gets ``R // replay_people``, the first ``R % replay_people`` people one more. Every
    replay person keeps at least one document and at most the `docs_per_person` it has, so
    ``replay_people <= R <= replay_people * docs_per_person``; otherwise a ValueError names
    ``data.embedded.replay_share`` and the shares that fit.
    """
    total = round(share / (1.0 - share) * main_documents)
    if not replay_people <= total <= replay_people * docs_per_person:
        low = replay_people / (main_documents + replay_people)
        high = replay_people * docs_per_person / (main_documents + replay_people * docs_per_person)
        raise ValueError(
            f"data.embedded.replay_share={share} asks for {total} replay documents next to {main_documents} "
            f"main ones, but each of the {replay_people} replay people needs at least 1 and has at most "
            f"{docs_per_person} (data.embedded.docs_per_person); use a share in about [{low:.4f}, {high:.4f}] "
            "or change data.embedded.replay_num_people"
        )
    base, extra = divmod(total, replay_people)
    return [base + 1 if index < extra else base for index in range(replay_people)]


def embedded_key(
    seed: int,
    num_people: int,
    docs_per_person: int,
    replay_seed: int = -1,
    replay_num_people: int = 0,
    replay_share: float = 0.0,
    replay_docs_per_person: int = 0,
    replay_validation: bool = True,
) -> str:
    """Cache key of an embedded corpus (its text is a pure function of these).

    Without replay (``replay_seed`` < 0) the replay arguments are ignored and the key is
    ``biographies-s{seed}-n{num_people}-d{docs_per_person}``; with replay it gains
    ``-replay-s{replay_seed}-n{people}-p{share}`` (``replay_num_people`` 0 counts as
    `num_people`, so both spellings of one mix share a key), then ``-d{replay_docs_per_person}``
    when that differs from `docs_per_person` and ``-valnew`` when validation leaves the replay
    population out (the defaults add nothing: earlier keys stay valid).
    """
    key = f"biographies-s{seed}-n{num_people}-d{docs_per_person}"
    if replay_seed >= 0:
        key += f"-replay-s{replay_seed}-n{replay_num_people or num_people}-p{float(replay_share)!r}"
        if replay_docs_per_person and replay_docs_per_person != docs_per_person:
            key += f"-d{replay_docs_per_person}"
        if not replay_validation:
            key += "-valnew"
    return key
