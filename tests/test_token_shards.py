"""Token shards (`midus.data.token_shards`): the stream they hold is packing's, they read back as
packing's blocks, they resume to an uninterrupted run's bytes, and the loaders' resume and rank
sharding work over them unchanged."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from midus.data import packing
from midus.data.framing import frame_documents
from midus.data.packing import pack_documents
from midus.data.resumable_loader import EpochShuffleSampler, ResumableLoader, ShardSampler
from midus.data.token_shard_encoding import TextPass, held_out
from midus.data.token_shard_writer import write_token_shards
from midus.data.token_shards import MANIFEST, TokenBlocks, read_manifest
from midus.data.tokenizers import train_bpe
from tests.hf_standins import STANDIN_TEXT, bos_tokenizer

DOCUMENTS = [f"{text} Then {index % 7} more words followed, number {index}." for index, text in
             enumerate(STANDIN_TEXT)]
IDENTITY = {"text": "test", "tokenizer": "test", "max_tokens": 0}


@pytest.fixture(scope="module")
def kit_bpe() -> PreTrainedTokenizerFast:
    return train_bpe([DOCUMENTS], 300)


def write(directory: Path, tokenizer, documents=DOCUMENTS, holdout: float = 0.0, **options) -> dict:
    """Shards of `documents` (one pass; with `holdout` also validation) in small shards and units."""
    options = {"shard_tokens": 400, "unit_records": 7, "num_proc": 1, **options}
    text_pass = TextPass("train", lambda: iter(documents), holdout)
    return write_token_shards(directory, [text_pass], tokenizer, IDENTITY, "data.shards.directory", **options)


def stream_of(tokenizer, documents: list[str]) -> list[int]:
    """The packed stream: each document framed, then one EOS."""
    return [token for ids in frame_documents(tokenizer, documents) for token in [*ids, tokenizer.eos_token_id]]


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.bin"))}


@pytest.mark.parametrize("framing", ["kit bpe (frames nothing)", "BOS-prepending"])
def test_blocks_read_from_shards_are_pack_documents_blocks(tmp_path: Path, kit_bpe, framing: str) -> None:
    tokenizer = kit_bpe if framing.startswith("kit") else bos_tokenizer(DOCUMENTS)
    manifest = write(tmp_path, tokenizer)
    assert len([entry for entry in manifest["shards"] if entry["split"] == "train"]) > 3  # rows cross shard ends
    blocks = TokenBlocks(tmp_path, "train", 31)
    packed = pack_documents(Dataset.from_dict({"text": DOCUMENTS}), tokenizer, 31, "training")  # one map batch
    assert len(blocks) == len(packed) > 10
    assert torch.equal(blocks[:]["input_ids"], packed[:]["input_ids"])
    assert all(torch.equal(blocks[index]["input_ids"], packed[index]["input_ids"]) for index in (0, 5, -1))
    assert torch.equal(blocks[[3, 1]]["input_ids"], packed[[3, 1]]["input_ids"])
    assert blocks[0]["input_ids"].dtype == torch.long and blocks.tokens == len(stream_of(tokenizer, DOCUMENTS))


def test_with_several_map_batches_pack_documents_drops_a_partial_row_per_batch(
    tmp_path: Path, kit_bpe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shards cut rows over the whole stream; pack_documents over each map batch's stream, dropping
    # each batch's last partial row. So its rows of batch b are the stream's rows from where batch
    # b starts, and the shards hold every row of the stream.
    monkeypatch.setattr(packing, "MAP_BATCH_RECORDS", 50)
    write(tmp_path, kit_bpe)
    row = 32
    packed = pack_documents(Dataset.from_dict({"text": DOCUMENTS}), kit_bpe, row - 1, "training")[:]["input_ids"]
    blocks = TokenBlocks(tmp_path, "train", row - 1)
    stream = stream_of(kit_bpe, DOCUMENTS)
    assert blocks[:]["input_ids"].flatten().tolist() == stream[: len(blocks) * row]
    expected, start = [], 0
    for batch in range(math.ceil(len(DOCUMENTS) / 50)):
        length = len(stream_of(kit_bpe, DOCUMENTS[batch * 50 : (batch + 1) * 50]))
        expected += stream[start : start + length - length % row]
        start += length
    assert packed.flatten().tolist() == expected
    assert len(packed) < len(blocks) == len(stream) // row


def test_ids_over_65535_are_kept_as_uint32(tmp_path: Path) -> None:
    vocab = {"<eos>": 0, **{f"w{index}": index for index in range(1, 70_000)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    documents = ["w69999 w65536 w7", "w65535 w2"]
    manifest = write(tmp_path, tokenizer, documents)
    assert manifest["dtype"] == "uint32"
    assert (tmp_path / "train-00000.bin").stat().st_size == 4 * 7
    assert TokenBlocks(tmp_path, "train", 6)[0]["input_ids"].tolist() == [69999, 65536, 7, 0, 65535, 2, 0]


def test_the_vocabulary_of_the_kit_is_stored_as_uint16(tmp_path: Path, kit_bpe) -> None:
    manifest = write(tmp_path, kit_bpe)
    size = sum(path.stat().st_size for path in tmp_path.glob("*.bin"))
    assert manifest["dtype"] == "uint16" and size == 2 * len(stream_of(kit_bpe, DOCUMENTS))


def test_held_out_records_are_ceil_of_the_fraction_spread_evenly() -> None:
    for fraction in (0.05, 0.1, 1 / 3, 0.5):
        picks = [held_out(index, fraction) for index in range(200)]
        assert picks[0]
        assert all(sum(picks[:count]) == math.ceil(count * fraction - 1e-9) for count in range(1, 201))


def test_a_holdout_pass_fills_both_splits_in_stream_order(tmp_path: Path, kit_bpe) -> None:
    manifest = write(tmp_path, kit_bpe, holdout=0.1)
    held = [text for index, text in enumerate(DOCUMENTS) if held_out(index, 0.1)]
    kept = [text for index, text in enumerate(DOCUMENTS) if not held_out(index, 0.1)]
    assert TokenBlocks(tmp_path, "validation", 15).tokens == len(stream_of(kit_bpe, held))
    assert TokenBlocks(tmp_path, "train", 15)[:]["input_ids"].flatten().tolist() == stream_of(kit_bpe, kept)[
        : len(TokenBlocks(tmp_path, "train", 15)) * 16
    ]
    assert manifest["done"] == ["train", "validation"]


@pytest.mark.parametrize("holdout", [0.0, 0.1])
def test_an_interrupted_preparation_resumes_to_the_uninterrupted_bytes(tmp_path: Path, kit_bpe, holdout) -> None:
    whole = write(tmp_path / "whole", kit_bpe, holdout=holdout)
    parts = tmp_path / "parts"
    first = write(parts, kit_bpe, holdout=holdout, stop_after=3)
    assert "train" not in first["done"] and len({entry["records"] for entry in first["shards"]}) == 3
    assert write(parts, kit_bpe, holdout=holdout) == whole
    assert shard_bytes(parts) == shard_bytes(tmp_path / "whole")
    # Any number of processes writes the same shards.
    assert write(tmp_path / "two", kit_bpe, holdout=holdout, num_proc=2) == whole
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "whole")


def test_a_rerun_reads_the_records_already_prepared_but_does_not_tokenise_them(tmp_path: Path, kit_bpe) -> None:
    write(tmp_path, kit_bpe, stop_after=2)
    prepared = read_manifest(tmp_path, "data.shards.directory")["shards"][-1]["records"]
    encoded: list[str] = []

    class Counting(type(kit_bpe)):
        def __call__(self, texts, **options):
            encoded.extend(texts if isinstance(texts, list) else [])
            return super().__call__(texts, **options)

    counting = Counting(tokenizer_object=kit_bpe.backend_tokenizer, eos_token=kit_bpe.eos_token)
    write(tmp_path, counting)
    assert [text for text in encoded if text != "framing probe"] == DOCUMENTS[prepared:]


def test_a_deleted_or_truncated_last_shard_is_prepared_again(tmp_path: Path, kit_bpe) -> None:
    whole = write(tmp_path / "whole", kit_bpe)
    expected = shard_bytes(tmp_path / "whole")
    directory = tmp_path / "damaged"
    write(directory, kit_bpe)
    # The last shard and its manifest entry gone, as if the run had stopped before writing it.
    manifest = json.loads((directory / MANIFEST).read_text())
    last = manifest["shards"].pop()
    manifest["done"] = []
    (directory / MANIFEST).write_text(json.dumps(manifest))
    (directory / last["file"]).unlink()
    assert write(directory, kit_bpe) == whole and shard_bytes(directory) == expected
    # A shard cut short on disk: it and the shards after it are made again.
    middle = directory / whole["shards"][2]["file"]
    middle.write_bytes(middle.read_bytes()[:-2])
    (directory / "train-00099.bin.partial").write_bytes(b"\0\0")  # a leftover of a killed run
    assert write(directory, kit_bpe) == whole and shard_bytes(directory) == expected
    assert not list(directory.glob("*.partial"))


def test_a_lost_validation_shard_of_a_holdout_pass_redoes_the_training_shards_after_it(
    tmp_path: Path, kit_bpe
) -> None:
    whole = write(tmp_path / "whole", kit_bpe, holdout=0.1)
    directory = tmp_path / "damaged"
    write(directory, kit_bpe, holdout=0.1)
    (directory / "validation-00000.bin").unlink()  # the pass continues from its start: both splits again
    assert write(directory, kit_bpe, holdout=0.1) == whole
    assert shard_bytes(directory) == shard_bytes(tmp_path / "whole")


def test_a_directory_holding_other_files_is_not_written_into(tmp_path: Path, kit_bpe) -> None:
    (tmp_path / "notes.bin").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"holds other files \(notes.bin\) and no token-shard manifest.json"):
        write(tmp_path, kit_bpe)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.bin"]


def test_a_token_budget_stops_the_stream_mid_document(tmp_path: Path, kit_bpe) -> None:
    stream = stream_of(kit_bpe, DOCUMENTS)
    manifest = write(tmp_path, kit_bpe, max_tokens=1001)
    blocks = TokenBlocks(tmp_path, "train", 9)
    assert blocks.tokens == 1001 and len(blocks) == 100 and manifest["done"] == ["train"]
    assert blocks[:]["input_ids"].flatten().tolist() == stream[:1000]


def test_a_directory_of_other_settings_is_refused_by_field(tmp_path: Path, kit_bpe) -> None:
    write(tmp_path, kit_bpe)
    with pytest.raises(ValueError, match=r"data.shards.directory: .* holds token shards prepared with other settings "
                                         r"\(max_tokens: 0 there, 5 now\)"):
        write_token_shards(tmp_path, [], kit_bpe, {**IDENTITY, "max_tokens": 5}, "data.shards.directory")


def test_a_resumed_loader_serves_the_uninterrupted_batches(tmp_path: Path, kit_bpe) -> None:
    write(tmp_path, kit_bpe)
    blocks = TokenBlocks(tmp_path, "train", 15)

    def loader() -> ResumableLoader:
        return ResumableLoader(blocks, EpochShuffleSampler(blocks, 1, 0, seed=11), batch_size=4)

    original = loader()
    original.sampler.set_epoch(1)
    batches = iter(original)
    served = [next(batches)["input_ids"] for _ in range(5)]
    state = original.state_dict()
    rest = [batch["input_ids"] for batch in batches]
    restored = loader()
    restored.load_state_dict(state)
    restored.sampler.set_epoch(1)
    assert torch.equal(torch.cat([batch["input_ids"] for batch in restored]), torch.cat(rest))
    everything = torch.cat(served + rest)
    order = EpochShuffleSampler(blocks, 1, 0, seed=11)
    order.set_epoch(1)
    order = list(order)  # a permutation: every block once per epoch
    assert len(everything) == len(blocks) // 4 * 4 and sorted(order) == list(range(len(blocks)))
    assert torch.equal(everything, blocks[order[: len(everything)]]["input_ids"])


def test_two_ranks_see_disjoint_blocks(tmp_path: Path, kit_bpe) -> None:
    write(tmp_path, kit_bpe, holdout=0.1)
    train, validation = TokenBlocks(tmp_path, "train", 15), TokenBlocks(tmp_path, "validation", 15)
    shards = []
    for rank in range(2):
        sampler = EpochShuffleSampler(train, 2, rank, seed=3)
        sampler.set_epoch(0)
        shards.append(set(sampler))
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == len(train) // 2 * 2
    scored = [list(ShardSampler(validation, 2, rank)) for rank in range(2)]
    assert sorted(scored[0] + scored[1]) == list(range(len(validation))) and not set(scored[0]) & set(scored[1])


def test_blocks_pickle_without_their_memory_maps(tmp_path: Path, kit_bpe) -> None:
    write(tmp_path, kit_bpe)
    blocks = TokenBlocks(tmp_path, "train", 15)
    first = blocks[0]["input_ids"]  # maps the files in this process
    copy = pickle.loads(pickle.dumps(blocks))  # what a DataLoader worker started by spawn receives
    assert copy._maps is None and torch.equal(copy[0]["input_ids"], first)
    assert len(pickle.dumps(blocks)) < 2000


def test_the_stream_holds_native_dtype_files_readable_with_numpy_alone(tmp_path: Path, kit_bpe) -> None:
    manifest = write(tmp_path, kit_bpe)
    files = [tmp_path / entry["file"] for entry in manifest["shards"]]
    ids = np.concatenate([np.fromfile(path, dtype=manifest["dtype"]) for path in files])
    assert ids.tolist() == stream_of(kit_bpe, DOCUMENTS)
