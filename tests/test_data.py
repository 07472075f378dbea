"""Data sources, tokenizers and packing of the DataModule."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from midus.training.data_module import EmbeddedCorpusConfig, LanguageModelingData
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
    data = files_data(tmp_path, train_files=[str(tmp_path / "train.txt")], val_fraction=0.25)
    alphabet = set(TEXT.replace("\n\n", ""))  # paragraphs are records; their separators are dropped
    assert data.vocab_size == len(alphabet) + 2  # characters + end-of-text + unknown
    ids = data.tokenizer("lazy fox", add_special_tokens=False)["input_ids"]
    assert data.tokenizer.decode(ids) == "lazy fox" and len(ids) == 8
    assert len(data.train_blocks) > 0 and len(data.val_blocks) > 0


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_files_read_the_text_field(tmp_path: Path, suffix: str) -> None:
    records = [{"body": f"record number {i} says hello", "id": i} for i in range(60)]
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    data = files_data(tmp_path, train_files=[str(path)], text_field="body")
    assert "record number" in data.tokenizer.decode(data.train_blocks[:]["input_ids"][0])
    with pytest.raises(ValueError, match=r"data.text_field='text' is not a column .*\['body', 'id'\]"):
        files_data(tmp_path, train_files=[str(path)])


def test_local_dataset_directory_goes_through_load_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of train"}) for i in range(80)))
    (folder / "validation.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of rain"}) for i in range(20)))
    data = files_data(tmp_path, source="hub", hub_dataset=str(folder))
    assert "of rain" in data.tokenizer.decode(data.val_blocks[:]["input_ids"][0])


def test_unreachable_hub_dataset_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # Offline mode fails at once instead of after network retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"data.hub_dataset='someone/not-cached' could not be loaded.*offline"):
        files_data(tmp_path, source="hub", hub_dataset="someone/not-cached")
    assert not (tmp_path / "cache" / "tokenizers").exists()


def test_missing_file_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data.train_files: '.*nope.txt' does not exist"):
        files_data(tmp_path, train_files=[str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match=r"data.train_files: '.*\*.txt' does not exist \(or matches no file\)"):
        files_data(tmp_path, train_files=[str(tmp_path / "*.txt")])


def test_corpus_too_small_for_one_block(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("hi there\n\nbye now\n\nok\n\nyes")
    with pytest.raises(ValueError, match=r"data.block_size=512: the training split has \d+ tokens, fewer than one block"):
        files_data(tmp_path, train_files=[str(tmp_path / "tiny.txt")], block_size=512)


def test_hf_tokenizer_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.tokenizer_path: .*absent: no such checkpoint directory"):
        LanguageModelingData(tokenizer="hf", tokenizer_path=str(tmp_path / "absent"), cache_dir=str(tmp_path))


def test_hf_tokenizer_directory_is_used_as_is(tmp_path: Path, tiny_data: LanguageModelingData) -> None:
    tiny_data.tokenizer.save_pretrained(str(tmp_path / "tok"))
    data = LanguageModelingData(
        embedded=EmbeddedCorpusConfig(seed=0, num_people=30, docs_per_person=4),
        tokenizer="hf", tokenizer_path=str(tmp_path / "tok"), block_size=32, cache_dir=str(tmp_path / "cache"),
    )
    assert data.tokenizer.get_vocab() == tiny_data.tokenizer.get_vocab()
    assert data.train_blocks[:]["input_ids"].tolist() == tiny_data.train_blocks[:]["input_ids"].tolist()


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare.txt").is_file(), reason="../shared/data is absent")
def test_real_text_file_with_bpe(tmp_path: Path) -> None:
    data = files_data(
        tmp_path, train_files=[str(SHARED_DATA / "tinyshakespeare.txt")], tokenizer="bpe", bpe_vocab_size=512,
        block_size=128,
    )
    # A 512-token BPE compresses English well below one token per character.
    characters = len(data.tokenizer.decode(data.train_blocks[:]["input_ids"][0]))
    assert characters / 129 > 1.5
    assert len(data.train_blocks) > 1000
