"""Documents framed as the tokenizer frames them (midus.data.framing), in packing and prompts (issue 25).

The reference is the tokenizer itself: ``tok(text)`` with its special tokens (Llama-3's BOS,
through its post-processor) against ``tok(text, add_special_tokens=False)``, which is how the
kit packed every document before. The kit's own bpe and char tokenizers add nothing, so their
blocks and cache names must be exactly what they were.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from midus.data.framing import frame_documents, frame_prompts, framing_adds_tokens, framing_of
from midus.data.packing import cached_blocks, pack_documents
from midus.data.tokenizers import train_bpe, train_char
from tests.hf_standins import BOS, EOS, STANDIN_TEXT, bos_tokenizer, write_parquet_shards

BLOCK = 16


def unframed_packing(tokenizer: PreTrainedTokenizerBase, texts: list[str], block_size: int) -> list[list[int]]:
    """The kit's packing before framing: ``add_special_tokens=False`` ids + EOS, cut into rows."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [*ids, tokenizer.eos_token_id]
    row = block_size + 1
    return [stream[i : i + row] for i in range(0, len(stream) - len(stream) % row, row)]


def unframed_cache_name(tokenizer: PreTrainedTokenizerBase, corpus_key: str, block_size: int, split: str) -> str:
    """`cached_blocks`' directory name before framing (the fingerprint of the backend and EOS)."""
    fingerprint = f"{tokenizer.backend_tokenizer.to_str()}|eos={tokenizer.eos_token_id}"
    return f"{corpus_key}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}-block{block_size}-{split}"


def eos_appending_tokenizer() -> PreTrainedTokenizerFast:
    """The stand-in BPE with a template that appends EOS too (``BOS $A EOS``, BERT/T5-style)."""
    backend = Tokenizer.from_str(bos_tokenizer(STANDIN_TEXT).backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, backend.token_to_id(BOS)), (EOS, backend.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The stand-in documents as they arrive from parquet shards."""
    paths = write_parquet_shards(tmp_path_factory.mktemp("shards"), STANDIN_TEXT, shards=3)
    return Dataset.from_parquet([str(path) for path in paths])


@pytest.mark.parametrize("make", [lambda: train_bpe([STANDIN_TEXT], 300), lambda: train_char([STANDIN_TEXT])],
                         ids=["bpe", "char"])
def test_kit_tokenizers_frame_nothing_and_pack_and_cache_exactly_as_before(
    make, shards: Dataset, tmp_path: Path
) -> None:
    tokenizer = make()
    texts = list(shards["text"])
    assert not framing_adds_tokens(tokenizer)
    assert frame_documents(tokenizer, texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert frame_prompts(tokenizer, ["the cat"]) == [
        [tokenizer.eos_token_id, *tokenizer("the cat", add_special_tokens=False)["input_ids"]]
    ]
    reference = unframed_packing(tokenizer, texts, BLOCK)
    assert pack_documents(shards, tokenizer, BLOCK, "training")[:]["input_ids"].tolist() == reference
    blocks = cached_blocks(shards, tokenizer, BLOCK, "training", tmp_path, "files-abc")
    assert blocks[:]["input_ids"].tolist() == reference
    # Same directory name as before framing existed: existing caches (and curves) stay valid.
    assert [path.name for path in (tmp_path / "blocks").iterdir()] == [
        unframed_cache_name(tokenizer, "files-abc", BLOCK, "training")
    ]


def test_a_bos_tokenizer_starts_every_packed_document_with_bos(shards: Dataset) -> None:
    tokenizer = bos_tokenizer(STANDIN_TEXT)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    texts = list(shards["text"])
    framing = framing_of(tokenizer)
    assert framing_adds_tokens(tokenizer) and framing.prefix == (bos,) and framing.suffix == ()
    framed = frame_documents(tokenizer, texts)
    assert framed == tokenizer(texts)["input_ids"]  # what the tokenizer itself gives
    assert framed == [[bos, *ids] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    rows = pack_documents(shards, tokenizer, BLOCK, "training")[:]["input_ids"]
    stream = [token for ids in framed for token in (*ids, eos)]
    assert rows.flatten().tolist() == stream[: rows.numel()]
    starts = [sum(len(ids) + 1 for ids in framed[:index]) for index in range(len(framed))]
    started = sum(start < rows.numel() for start in starts)
    assert int((rows == bos).sum()) == started > 100  # one BOS per document started, and only those
    assert int((rows == eos).sum()) == sum(start + len(ids) < rows.numel() for start, ids in zip(starts, framed))
    assert frame_prompts(tokenizer, ["the cat"]) == [tokenizer("the cat")["input_ids"]]  # BOS, no EOS before it


def test_an_unframed_cache_of_a_bos_tokenizer_is_not_reused(shards: Dataset, tmp_path: Path) -> None:
    tokenizer = bos_tokenizer(STANDIN_TEXT)
    old_name = unframed_cache_name(tokenizer, "files-abc", BLOCK, "training")
    stale = Dataset.from_dict({"input_ids": unframed_packing(tokenizer, list(shards["text"]), BLOCK)})
    stale.save_to_disk(str(tmp_path / "blocks" / old_name))  # a cache written before framing: no BOS

    blocks = cached_blocks(shards, tokenizer, BLOCK, "training", tmp_path, "files-abc")
    fresh = pack_documents(shards, tokenizer, BLOCK, "training")[:]["input_ids"]
    assert blocks[:]["input_ids"].tolist() == fresh.tolist()
    assert int((fresh == tokenizer.bos_token_id).sum()) > 0
    names = sorted(path.name for path in (tmp_path / "blocks").iterdir())
    assert len(names) == 2 and old_name in names  # a new key beside the stale one, which is left as it was
    # Read back from its own cache on the next run.
    again = cached_blocks(shards, tokenizer, BLOCK, "training", tmp_path, "files-abc")
    assert again[:]["input_ids"].tolist() == blocks[:]["input_ids"].tolist()


def test_a_template_that_appends_eos_gives_one_eos_between_documents() -> None:
    tokenizer = eos_appending_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    texts = ["the cat walked", "the dog slept", f"the owl{EOS}"]  # the last ends in the literal EOS text
    plain = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer(texts[0])["input_ids"] == [bos, *plain[0], eos]  # the template's trailing EOS
    assert framing_of(tokenizer).drops_trailing_eos
    framed = frame_documents(tokenizer, texts)
    assert framed == [[bos, *ids] for ids in plain]
    assert framed[2][-1] == eos  # the text's own EOS is text, not frame: it stays

    rows = pack_documents(Dataset.from_dict({"text": texts[:2] * 20}), tokenizer, 7, "training")[:]["input_ids"]
    stream = [token for ids in framed[:2] * 20 for token in (*ids, eos)]
    assert rows.flatten().tolist() == stream[: rows.numel()]
    assert [eos, eos] not in [rows.flatten().tolist()[i : i + 2] for i in range(rows.numel() - 1)]


def test_predict_prompts_are_framed_as_packed_documents(tmp_path: Path) -> None:
    from midus.data.datamodule import FilesConfig, LanguageModelingData

    tokenizer_dir = tmp_path / "tokenizer"
    bos_tokenizer(STANDIN_TEXT).save_pretrained(str(tokenizer_dir))
    train = write_parquet_shards(tmp_path / "train", STANDIN_TEXT[:150])
    val = write_parquet_shards(tmp_path / "val", STANDIN_TEXT[150:])
    files = FilesConfig(train=[str(path) for path in train], val=[str(path) for path in val])
    common = dict(source="files", files=files, block_size=BLOCK, batch_size=4, cache_dir=str(tmp_path / "cache"),
                  predict_prompts=["the cat"])
    for kind in ("hf", "char"):
        data = LanguageModelingData(tokenizer=kind, tokenizer_path=str(tokenizer_dir) if kind == "hf" else "", **common)
        (batch,) = list(data.predict_dataloader())
        plain = data.tokenizer("the cat", add_special_tokens=False)["input_ids"]
        start = data.tokenizer.bos_token_id if kind == "hf" else data.tokenizer.eos_token_id
        assert batch["input_ids"].tolist() == [[start, *plain]]
        if kind == "hf":  # and the training blocks of the run start documents with BOS
            assert int((data.train_blocks[:]["input_ids"] == start).sum()) > 10


def test_long_records_are_tokenised_a_few_at_a_time_and_short_ones_as_before() -> None:
    from datasets import Dataset

    from midus.data.packing import MAP_BATCH_CHARS, MAP_BATCH_RECORDS, map_batch_size

    short = Dataset.from_dict({"text": ["a biography of some five hundred characters " * 11] * 50})
    assert map_batch_size(short) == MAP_BATCH_RECORDS  # the embedded corpus packs exactly as before
    articles = Dataset.from_dict({"text": ["x" * 20_000] * 50})
    assert map_batch_size(articles) == MAP_BATCH_CHARS // 20_000
    assert map_batch_size(Dataset.from_dict({"text": ["x" * (MAP_BATCH_CHARS * 2)]})) == 1
