"""Data sources, tokenizers and packing of the DataModule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from midus.data.corpus import ATTRIBUTES, BiographyCorpus, generate_population
from midus.data.datamodule import EmbeddedCorpusConfig, FilesConfig, HubConfig, LanguageModelingData
from midus.data.embedded_splits import embedded_key, embedded_splits, replay_counts, shared_names
from tests.conftest import SHARED_DATA

TEXT = "The quick brown fox jumps over the lazy dog.\n\nA second paragraph of plain text here.\n\n" * 40


def files_data(tmp_path: Path, **overrides) -> LanguageModelingData:
    options = dict(source="files", tokenizer="char", block_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"))
    options.update(overrides)
    return LanguageModelingData(**options)


def test_blocks_are_the_document_stream_cut_into_rows(tiny_data: LanguageModelingData) -> None:
    tokenizer = tiny_data.tokenizer
    stream: list[int] = []
    for document in tiny_data.corpus.train_documents():
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = tiny_data.train_blocks[:]["input_ids"]
    assert rows.shape[1] == 33  # block_size + 1: inputs and shifted targets
    assert rows.flatten().tolist() == stream[: rows.numel()]
    assert tiny_data.vocab_size == len(tokenizer) == 300


def test_bpe_tokenizer_is_cached_by_corpus_and_vocabulary(tiny_cache: Path, tiny_data: LanguageModelingData) -> None:
    cached = {path.name for path in (tiny_cache / "tokenizers").iterdir()}
    assert "biographies-s0-n30-d4-bpe300" in cached
    again = LanguageModelingData(
        embedded=EmbeddedCorpusConfig(seed=0, num_people=30, docs_per_person=4),
        bpe_vocab_size=300, block_size=32, cache_dir=str(tiny_cache),
    )
    assert again.tokenizer.get_vocab() == tiny_data.tokenizer.get_vocab()
    assert {path.name for path in (tiny_cache / "tokenizers").iterdir()} == cached


def test_text_files_with_char_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text(TEXT)
    data = files_data(tmp_path, files=FilesConfig(train=[str(tmp_path / "train.txt")], val_fraction=0.25))
    alphabet = set(TEXT.replace("\n\n", ""))  # paragraphs are records; their separators are dropped
    assert data.vocab_size == len(alphabet) + 2  # characters + end-of-text + unknown
    ids = data.tokenizer("lazy fox", add_special_tokens=False)["input_ids"]
    assert data.tokenizer.decode(ids) == "lazy fox" and len(ids) == 8
    # 80 paragraphs of 44 and 38 characters, each + end-of-text: 3,360 tokens in rows of 17, each
    # split losing at most its last partial row; a quarter of the records is held out.
    train, val = len(data.train_blocks), len(data.val_blocks)
    assert 3360 - 2 * 16 <= (train + val) * 17 <= 3360
    assert val / (train + val) == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_files_read_the_text_field(tmp_path: Path, suffix: str) -> None:
    records = [{"body": f"record number {i} says hello", "id": i} for i in range(60)]
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    data = files_data(tmp_path, files=FilesConfig(train=[str(path)], text_field="body"))
    assert "record number" in data.tokenizer.decode(data.train_blocks[:]["input_ids"][0])
    with pytest.raises(ValueError, match=r"data.files.text_field='text' is not a column .*\['body', 'id'\]"):
        files_data(tmp_path, files=FilesConfig(train=[str(path)]))


def test_local_dataset_directory_goes_through_load_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of train"}) for i in range(80)))
    (folder / "validation.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of rain"}) for i in range(20)))
    data = files_data(tmp_path, source="hub", hub=HubConfig(dataset=str(folder)))
    assert "of rain" in data.tokenizer.decode(data.val_blocks[:]["input_ids"][0])


def test_unreachable_hub_dataset_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # Offline mode fails at once instead of after network retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"data.hub.dataset='someone/not-cached' could not be loaded.*offline"):
        files_data(tmp_path, source="hub", hub=HubConfig(dataset="someone/not-cached"))
    assert not (tmp_path / "cache" / "tokenizers").exists()


def test_missing_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data.files.train: '.*nope.txt' does not exist"):
        files_data(tmp_path, files=FilesConfig(train=[str(tmp_path / "nope.txt")]))
    with pytest.raises(FileNotFoundError, match=r"data.files.train: '.*\*.txt' does not exist \(or matches no file\)"):
        files_data(tmp_path, files=FilesConfig(train=[str(tmp_path / "*.txt")]))


def test_corpus_too_small_for_one_block(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("hi there\n\nbye now\n\nok\n\nyes")
    with pytest.raises(
        ValueError, match=r"data.block_size=512: the training split has \d+ tokens, fewer than one block"
    ):
        files_data(tmp_path, block_size=512, files=FilesConfig(train=[str(tmp_path / "tiny.txt")]))


def test_hf_tokenizer_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.tokenizer_path: .*absent: no such checkpoint directory"):
        LanguageModelingData(tokenizer="hf", tokenizer_path=str(tmp_path / "absent"), cache_dir=str(tmp_path))


def test_hf_tokenizer_directory_is_used_as_is(tmp_path: Path, tiny_data: LanguageModelingData) -> None:
    tiny_data.tokenizer.save_pretrained(str(tmp_path / "tok"))
    data = LanguageModelingData(
        embedded=EmbeddedCorpusConfig(seed=0, num_people=30, docs_per_person=4),
        tokenizer="hf",
        tokenizer_path=str(tmp_path / "tok"),
        block_size=32,
        cache_dir=str(tmp_path / "cache"),
    )
    assert data.tokenizer.get_vocab() == tiny_data.tokenizer.get_vocab()
    assert data.train_blocks[:]["input_ids"].tolist() == tiny_data.train_blocks[:]["input_ids"].tolist()


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare.txt").is_file(), reason="../shared/data is absent")
def test_real_text_file_with_bpe(tmp_path: Path) -> None:
    data = files_data(
        tmp_path,
        tokenizer="bpe",
        bpe_vocab_size=512,
        block_size=128,
        files=FilesConfig(train=[str(SHARED_DATA / "tinyshakespeare.txt")]),
    )
    # A 512-token BPE compresses English well below one token per character.
    characters = len(data.tokenizer.decode(data.train_blocks[:]["input_ids"][0]))
    assert characters / 129 > 1.5
    assert len(data.train_blocks) > 1000


# --- replay: a second population mixed into training (continued pre-training) ----------------

REPLAY = dict(seed=1, num_people=20, docs_per_person=3, replay_seed=0, replay_num_people=30, replay_share=0.4)


def replay_data(cache_dir: Path, **overrides) -> LanguageModelingData:
    options = dict(embedded=EmbeddedCorpusConfig(**REPLAY), bpe_vocab_size=300, block_size=32, cache_dir=str(cache_dir))
    options.update(overrides)
    return LanguageModelingData(**options)


def documents_about(documents: list[str], people: list) -> list[int]:
    """How many of `documents` name each person (every biography names its person first)."""
    return [sum(bool(re.search(rf"\b{person.name}\b", doc)) for doc in documents) for person in people]


def test_replay_mix_holds_both_populations_in_the_requested_share() -> None:
    main, replay = BiographyCorpus(1, 20, 3), BiographyCorpus(0, 30, 3)
    splits = embedded_splits(main, replay, 0.4)
    train, validation = splits["train"]["text"], splits["validation"]["text"]
    # All 60 main documents, and round(0.4 / 0.6 * 60) = 40 replay documents spread over 30 people.
    assert sorted(doc for doc in train if doc in set(main.train_documents())) == sorted(main.train_documents())
    replayed = [doc for doc in train if doc not in set(main.train_documents())]
    assert len(replayed) == 40 and len(train) == 100  # share 0.4 exactly
    assert documents_about(replayed, replay.people) == [2] * 10 + [1] * 20
    assert documents_about(train, main.people) == [3] * 20
    # Replayed documents are the replay population's own training documents (its first renderings).
    assert sorted(replayed) == sorted(replay.train_documents(replay_counts(30, 60, 3, 0.4)))
    assert set(replayed) <= set(replay.train_documents())
    assert train != main.train_documents() + replayed  # the two populations are shuffled together
    assert validation == main.validation_documents() + replay.validation_documents()
    # Deterministic, and a share that is not exact is rounded to whole documents.
    assert embedded_splits(main, replay, 0.4)["train"]["text"] == train
    uneven = embedded_splits(main, replay, 0.33)["train"]["text"]
    assert len(uneven) - 60 == round(0.33 / 0.67 * 60) == 30
    assert documents_about(uneven, replay.people) == [1] * 30


def test_replay_counts_spread_documents_evenly_and_name_the_share() -> None:
    assert replay_counts(4, 30, 5, 0.25) == [3, 3, 2, 2]  # 10 documents
    assert replay_counts(4, 12, 1, 0.25) == [1, 1, 1, 1]
    with pytest.raises(
        ValueError, match=r"data.embedded.replay_share=0.1 asks for 3 replay documents .* 4 replay people"
    ):
        replay_counts(4, 30, 5, 0.1)  # a replay person would keep no document
    with pytest.raises(ValueError, match=r"data.embedded.replay_share=0.9 .* at most 5 .*docs_per_person"):
        replay_counts(4, 30, 5, 0.9)  # more documents than the replay population has


def test_populations_of_seeds_0_and_1_are_disjoint() -> None:
    # The kit's default sizes (200 people) and the test sizes: no shared person.
    for people in (200, 30, 20):
        assert not shared_names(BiographyCorpus(1, people, 1), BiographyCorpus(0, people, 1))
    assert not {p.name for p in generate_population(0, 5000)} & {p.name for p in generate_population(1, 5000)}


def test_a_name_shared_with_the_replay_population_leaves_the_main_population(tmp_path: Path) -> None:
    # Populations 233 and 486 of 20 people share one name (found by search; checked here).
    main, replay = BiographyCorpus(233, 20, 3), BiographyCorpus(486, 20, 3)
    shared = shared_names(main, replay)
    assert len(shared) == 1
    (name,) = shared
    data = replay_data(
        tmp_path, embedded=EmbeddedCorpusConfig(**{**REPLAY, "seed": 233, "replay_seed": 486, "replay_num_people": 20})
    )
    assert data.dropped_people == shared
    splits = embedded_splits(main, replay, 0.4)
    about = {
        person.name: count for person, count in zip(main.people, documents_about(splits["train"]["text"], main.people))
    }
    assert about[name] == 2  # the replay person's own documents only (ceil(38 / 20) = 2 for the first 18)
    assert sum(about.values()) - about[name] == 19 * 3
    assert len(splits["validation"]["text"]) == 19 + 20
    for phrasing, corpus, people in (("train", data.corpus, 19), ("replay", data.replay_corpus, 20)):
        prompts = [data.tokenizer.decode(q.prompt[1:]) for q in data.recall_questions[phrasing]]
        assert len(prompts) == people * len(ATTRIBUTES)
        assert any(name in prompt for prompt in prompts) == (phrasing == "replay")


def test_recall_questions_probe_each_population(tiny_cache: Path) -> None:
    data = replay_data(tiny_cache)
    main, replay = data.corpus, data.replay_corpus
    assert (main.seed, len(main.people), replay.seed, len(replay.people)) == (1, 20, 0, 30)
    assert list(data.recall_questions) == ["train", "heldout", "replay", "replay_heldout"]
    sources = {
        "train": (main, "train"),
        "heldout": (main, "heldout"),
        "replay": (replay, "train"),
        "replay_heldout": (replay, "heldout"),
    }
    for key, (corpus, phrasing) in sources.items():
        facts = {person.name: person.attributes for person in corpus.people}
        items = corpus.recall_probe(phrasing)
        questions = data.recall_questions[key]
        assert len(questions) == len(items) == len(corpus.people) * len(ATTRIBUTES)
        for question, item in zip(questions, items):
            assert question.prompt[0] == data.tokenizer.eos_token_id
            assert data.tokenizer.decode(question.prompt[1:]) == item.prompt
            assert data.tokenizer.decode(question.answer) == " " + facts[item.person][item.attribute]
            assert question.attribute == item.attribute and item.person in item.prompt
    # The four keys are the metrics val/recall_acc, val/recall_acc_heldout, val/recall_acc_replay, ..._heldout.
    assert data.recall_questions["train"] != data.recall_questions["replay"]

    def stream(documents: list[str]) -> list[int]:
        ids = data.tokenizer(documents, add_special_tokens=False)["input_ids"]
        return [token for document in ids for token in document + [data.tokenizer.eos_token_id]]

    # Validation text covers both populations: one held-out biography per person, main then replay.
    val = stream(main.validation_documents() + replay.validation_documents())
    assert data.val_blocks[:]["input_ids"].flatten().tolist() == val[: len(data.val_blocks) * 33]
    assert len(data.val_blocks) == len(val) // 33
    # Training text is every main document plus the replay documents that make up share 0.4
    # (shuffled together, so only the token count is order-free).
    train = stream(main.train_documents() + replay.train_documents(replay_counts(30, 60, 3, 0.4)))
    assert len(data.train_blocks) == len(train) // 33


def test_embedded_key_includes_the_replay_settings() -> None:
    plain = embedded_key(1, 20, 3)
    assert plain == "biographies-s1-n20-d3" == embedded_key(1, 20, 3, -1, 30, 0.4)  # no replay: settings unused
    mix = embedded_key(1, 20, 3, 0, 30, 0.4)
    assert mix == "biographies-s1-n20-d3-replay-s0-n30-p0.4"
    others = {
        embedded_key(1, 20, 3, 2, 30, 0.4),
        embedded_key(1, 20, 3, 0, 31, 0.4),
        embedded_key(1, 20, 3, 0, 30, 0.3),
    }
    assert len(others | {plain, mix}) == 5
    assert embedded_key(1, 20, 3, 0, 0, 0.4) == embedded_key(1, 20, 3, 0, 20, 0.4)  # 0 = num_people


def test_replay_population_keeps_the_base_runs_documents_and_can_leave_validation() -> None:
    # A new population with fewer renderings per person than the base's (2 against 4): the replay
    # population is generated with the base's 4, so what is replayed is the base run's own text.
    main, replay = BiographyCorpus(1, 20, 2), BiographyCorpus(0, 30, 4)
    splits = embedded_splits(main, replay, 0.5)
    replayed = [doc for doc in splits["train"]["text"] if doc not in set(main.train_documents())]
    assert len(replayed) == 40 and set(replayed) <= set(replay.train_documents())  # the base run's documents
    assert not set(replayed) <= set(BiographyCorpus(0, 30, 2).train_documents())  # not a 2-rendering draw
    assert splits["validation"]["text"] == main.validation_documents() + replay.validation_documents()
    new_only = embedded_splits(main, replay, 0.5, replay_validation=False)
    assert new_only["validation"]["text"] == main.validation_documents()
    assert new_only["train"]["text"] == splits["train"]["text"]  # training text is unchanged
    # Both settings name their text in the cache key; the defaults keep every earlier key.
    assert embedded_key(1, 20, 3, 0, 30, 0.4, 3, True) == embedded_key(1, 20, 3, 0, 30, 0.4)
    assert embedded_key(1, 20, 2, 0, 30, 0.4, 4) == "biographies-s1-n20-d2-replay-s0-n30-p0.4-d4"
    assert embedded_key(1, 20, 2, 0, 30, 0.4, 0, False) == "biographies-s1-n20-d2-replay-s0-n30-p0.4-valnew"


def test_replay_docs_per_person_and_replay_validation_reach_the_data(tmp_path: Path) -> None:
    settings = {**REPLAY, "docs_per_person": 2, "replay_docs_per_person": 4, "replay_validation": False}
    data = replay_data(tmp_path, embedded=EmbeddedCorpusConfig(**{**settings, "replay_share": 0.5}))
    assert data.replay_corpus.docs_per_person == 4 and data.corpus.docs_per_person == 2
    assert data.recall_questions["replay"]  # the replay probe runs without replay validation text
    blocks = {path.name.split("-bpe")[0] for path in (tmp_path / "tokenizers").iterdir()}
    assert blocks == {"biographies-s1-n20-d2-replay-s0-n30-p0.5-d4-valnew"}
    with pytest.raises(ValueError, match=r"data.embedded.replay_docs_per_person must be 0"):
        replay_data(tmp_path, embedded=EmbeddedCorpusConfig(**{**REPLAY, "replay_docs_per_person": -1}))


def test_replay_tokenizer_is_cached_under_the_mix_key(tiny_cache: Path) -> None:
    replay_data(tiny_cache)
    cached = {path.name for path in (tiny_cache / "tokenizers").iterdir()}
    assert "biographies-s1-n20-d3-replay-s0-n30-p0.4-bpe300" in cached


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(replay_share=0.0), r"data.embedded.replay_share must be in \(0, 1\) with replay, got 0.0"),
        (dict(replay_share=1.0), r"data.embedded.replay_share must be in \(0, 1\)"),
        (dict(replay_share=-0.5), r"data.embedded.replay_share must be in \(0, 1\)"),
        (dict(replay_share=0.95), r"data.embedded.replay_share=0.95 asks for 1140 replay documents"),
        (dict(replay_share=0.2), r"data.embedded.replay_share=0.2 asks for 15 replay documents"),
        (dict(replay_seed=1), r"data.embedded.replay_seed=1 equals data.embedded.seed"),
        (dict(replay_seed=-2), r"data.embedded.replay_seed must be >= 0, or -1 for no replay, got -2"),
        (dict(replay_num_people=-1), r"data.embedded.replay_num_people must be 0 \(= num_people\)"),
    ],
)
def test_bad_replay_settings_name_the_field(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replay_data(tmp_path, embedded=EmbeddedCorpusConfig(**{**REPLAY, **overrides}))
    assert not (tmp_path / "tokenizers").exists()  # failed before any tokenizer was trained


def test_replay_share_is_unchecked_without_replay(tmp_path: Path) -> None:
    data = replay_data(tmp_path, embedded=EmbeddedCorpusConfig(**{**REPLAY, "replay_seed": -1, "replay_share": 2.0}))
    assert data.replay_corpus is None and list(data.recall_questions) == ["train", "heldout"]


def test_replay_with_the_base_tokenizer_directory(tiny_cache: Path, tiny_data: LanguageModelingData) -> None:
    # Continued training: new population 1 plus replay of the base's population 0 (tiny_data's
    # corpus, 30 people x 4 documents), tokenised by the base corpus's cached BPE directory.
    base_tokenizer = tiny_cache / "tokenizers" / "biographies-s0-n30-d4-bpe300"
    before = {path.name for path in (tiny_cache / "tokenizers").iterdir()}
    data = replay_data(
        tiny_cache,
        tokenizer="hf",
        tokenizer_path=str(base_tokenizer),
        embedded=EmbeddedCorpusConfig(seed=1, num_people=30, docs_per_person=4, replay_seed=0, replay_share=0.25),
    )
    assert {path.name for path in (tiny_cache / "tokenizers").iterdir()} == before  # nothing trained
    assert data.tokenizer.get_vocab() == tiny_data.tokenizer.get_vocab() and data.vocab_size == 300
    # The replay population is the base's: its probe is exactly the base run's val/recall_acc probe.
    assert data.recall_questions["replay"] == tiny_data.recall_questions["train"]
    assert data.recall_questions["replay_heldout"] == tiny_data.recall_questions["heldout"]
    assert len(data.train_blocks) > len(tiny_data.train_blocks) // 3 and len(data.val_blocks) > len(
        tiny_data.val_blocks
    )
