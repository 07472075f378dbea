"""Tokenise documents and pack them into fixed-length training blocks.

Documents are framed as the tokenizer frames them (`midus.data.framing`: BOS where its
post-processor puts one, as Llama-3's does), joined with the end-of-text token and cut into
rows of ``block_size + 1`` tokens (inputs are a row without its last token, targets without
its first), so every token of a block is trained on and no padding is needed::

    [BOS] doc1 EOS [BOS] doc2 EOS [BOS] doc3 ...   → | row 0 | row 1 | ... (remainder dropped)

The kit's own bpe and char tokenizers frame nothing, so their blocks are the plain
``doc EOS doc EOS ...`` stream, and their cache names are what they were before framing.

`cached_blocks` keeps packed splits in the data cache, so a second run of an experiment, and
every process after the first of a multi-process run, reads them instead of packing again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from midus.data.framing import frame_documents, framing_of

log = logging.getLogger(__name__)


def pack_documents(
    documents: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, split: str, num_proc: int = 1
) -> Dataset:
    """`documents` with a ``text`` column → dataset with an ``input_ids`` column of rows of block_size+1.

    Each document is `frame_documents`' ids followed by one EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token (eos_token); documents could not be separated")
    row = block_size + 1

    def tokenize_and_chunk(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        stream: list[int] = []
        for ids in frame_documents(tokenizer, batch["text"]):
            stream.extend(ids)
            stream.append(eos)
        usable = len(stream) - len(stream) % row
        return {"input_ids": [stream[i : i + row] for i in range(0, usable, row)]}

    # Large map batches lose at most one partial row each; small corpora fit in one batch.
    packed = documents.map(
        tokenize_and_chunk,
        batched=True,
        batch_size=map_batch_size(documents),
        remove_columns=documents.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        desc=f"packing {split} into blocks of {block_size}",
    )
    if len(packed) == 0:
        total = sum(len(ids) + 1 for ids in frame_documents(tokenizer, documents[:]["text"]))
        raise ValueError(
            f"data.block_size={block_size}: the {split} split has {total} tokens, fewer than one block "
            f"of {row} (block_size + 1); lower data.block_size or add text"
        )
    return packed.with_format("torch")


MAP_BATCH_RECORDS = 2000
"""Records tokenised per call, as long as they are short (the embedded corpus's always are)."""
MAP_BATCH_CHARS = 8_000_000
"""Text per call at most, in characters: long records (WikiText articles read with
``data.files.sample_by: article``, ~19k characters each) get fewer per call, so one call's token lists
stay tens of MB instead of GB."""


def map_batch_size(documents: Dataset, sample: int = 1000) -> int:
    """Records per tokenising call: `MAP_BATCH_RECORDS`, fewer when the first `sample` records' mean
    length would put more than `MAP_BATCH_CHARS` characters in one call."""
    if len(documents) == 0:
        return MAP_BATCH_RECORDS
    texts = documents.select(range(min(sample, len(documents))))["text"]
    mean_chars = max(1.0, sum(len(text) for text in texts) / len(texts))
    return max(1, min(MAP_BATCH_RECORDS, int(MAP_BATCH_CHARS / mean_chars)))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of everything that decides a tokenizer's ids (its full serialisation when fast)
    and, for a tokenizer whose framing adds tokens, of that framing.

    Blocks packed before documents were framed (issue 25) hold no BOS; a framing tokenizer's
    hash therefore changes, so those caches are not reused. One that frames nothing (the kit's
    bpe and char) hashes as before: its blocks, and so its caches, are unchanged.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    framing = framing_of(tokenizer)
    if framing.adds_tokens:
        # A slow tokenizer's add_bos_token is outside its serialisation: hash the framing itself.
        text += f"|framing={list(framing.prefix)},{list(framing.suffix)},drop_eos={framing.drops_trailing_eos}"
    return hashlib.sha256(f"{text}|eos={tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def cached_blocks(
    documents: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, split: str, cache_dir: str | Path,
    corpus_key: str,
) -> Dataset:
    """`pack_documents`, read from ``<cache_dir>/blocks/`` when this corpus, tokenizer and block
    size were packed before (the caller holds the cache lock while this runs)."""
    name = f"{corpus_key}-{tokenizer_fingerprint(tokenizer)}-block{block_size}-{split}"
    directory = Path(cache_dir) / "blocks" / name
    if (directory / "dataset_info.json").is_file():
        log.info("data: %s blocks read from %s", split, directory)
        return load_from_disk(str(directory)).with_format("torch")
    packed = pack_documents(documents, tokenizer, block_size, split)
    partial = directory.with_name(directory.name + ".partial")  # a crash mid-write leaves no cache hit
    packed.with_format(None).save_to_disk(str(partial))
    partial.rename(directory)
    return load_from_disk(str(directory)).with_format("torch")
