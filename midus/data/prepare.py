"""Token shards of a run's text, prepared once: which directory, which tokenizer, what to write.

``data.format: shards`` reads the text as streams (`midus.data.streamed_text.StreamedText`: local
files record by record, a hub dataset with ``streaming=True``), tokenises it in ``data.shards.num_proc``
processes up to ``data.shards.max_tokens`` and keeps one copy, the token shards of
`midus.data.token_shards`, in a directory of its own::

    data.shards.directory, or <data.cache_dir>/shards/<corpus key>-<tokenizer>[-max<max_tokens>]

``<tokenizer>`` is ``bpe<vocabulary size>``, ``char`` or ``hf-<fingerprint>``. The block size is
not part of it: blocks are cut when the shards are read, so one preparation serves every
``data.block_size``. The directory holds the tokenizer too, so a complete one is read without
its text (a hub dataset is not contacted, a trained tokenizer not looked for).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from midus.data.packing import tokenizer_fingerprint
from midus.data.streamed_text import StreamedText
from midus.data.token_shard_encoding import TextPass, held_out
from midus.data.token_shard_writer import write_token_shards
from midus.data.token_shards import SPLITS, read_manifest, shard_tokens_of, stored_tokenizer
from midus.data.tokenizers import cached_tokenizer

log = logging.getLogger(__name__)

TRAINING_CHARS_PER_TOKEN = 4
"""With a token budget, a bpe/char tokenizer is trained on the first ``4 * data.shards.max_tokens``
characters of training text: about the text the budget covers (English BPE vocabularies of a
few thousand entries and more average 3-4.5 characters a token), where a stream has no end to
read to first."""


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenizer_label(kind: str, bpe_vocab_size: int, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """What names the tokenizer in a prepared directory's name: ``bpe<size>``, ``char`` or ``hf-<fingerprint>``."""
    if tokenizer is not None:
        return f"hf-{tokenizer_fingerprint(tokenizer)}"
    return f"bpe{bpe_vocab_size}" if kind == "bpe" else "char"


def shards_directory(cache_dir: str, prepared_dir: str, key: str, label: str, max_tokens: int) -> Path:
    """``data.shards.directory`` when set, else ``<cache_dir>/shards/<key>-<label>[-max<max_tokens>]``."""
    if prepared_dir:
        return Path(prepared_dir)
    return Path(cache_dir) / "shards" / (f"{key}-{label}" + (f"-max{max_tokens}" if max_tokens else ""))


def _training_batches(
    streams: dict, holdout: float, max_chars: int, batch: int = 1000
) -> Iterator[list[str]]:
    """The training records in lists of `batch`, what a bpe/char tokenizer is trained on; with
    `max_chars`, only until that many characters have been read."""
    texts: list[str] = []
    chars = 0
    for index, text in enumerate(streams["train"]()):
        if "validation" not in streams and holdout and held_out(index, holdout):
            continue
        texts.append(text)
        chars += len(text)
        if len(texts) == batch:
            yield texts
            texts = []
        if max_chars and chars >= max_chars:
            break
    if texts:
        yield texts


def prepare_shards(
    text: StreamedText,
    kind: str,
    tokenizer: PreTrainedTokenizerBase | None,
    bpe_vocab_size: int,
    cache_dir: str,
    prepared_dir: str = "",
    max_tokens: int = 0,
    num_proc: int = 0,
    shard_tokens: int = 1 << 26,
    stop_after: int = 0,
) -> tuple[PreTrainedTokenizerBase, Path]:
    """Prepare (or finish) the token shards of `text`; (the tokenizer, the prepared directory).

    Args:
        text: the text as streams, with its corpus key.
        kind: ``bpe``, ``char`` or ``hf`` (``data.tokenizer``, ``auto`` resolved).
        tokenizer: the ``hf`` tokenizer, None for a trained one (``bpe``/``char``: the directory's
            own when it has one, else the data cache's, trained on the training stream if absent).
        bpe_vocab_size: vocabulary size of a trained BPE.
        cache_dir: the data cache (trained tokenizers, default shard directories, locks).
        prepared_dir: where the shards go ("": under `cache_dir`).
        max_tokens: training tokens at most (0: all); see ``data.shards.max_tokens``.
        num_proc: tokenising processes (0: one per available core).
        shard_tokens: tokens per shard file (a shard closes at the first unit boundary past it).
        stop_after: stop after this many shard writes, as an interruption would (tests).

    Several processes of one run (and runs sharing the cache) prepare one directory once: the
    first takes a file lock beside the directory, the others wait and then read it.
    """
    label = tokenizer_label(kind, bpe_vocab_size, tokenizer)
    directory = shards_directory(cache_dir, prepared_dir, text.key, label, max_tokens)
    field = "data.shards.directory" if prepared_dir else "data.cache_dir"
    identity = {"text": text.key, "tokenizer": label, "max_tokens": max_tokens}
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory.parent / f".{directory.name}.lock")):
        manifest = read_manifest(directory, field)
        complete = manifest is not None and manifest["identity"] == identity and set(manifest["done"]) >= set(SPLITS)
        if tokenizer is None and manifest is not None and manifest["identity"] == identity:
            tokenizer = stored_tokenizer(directory)
        streams = None
        if tokenizer is None:
            streams = text.open()
            batches = _training_batches(streams, text.holdout, TRAINING_CHARS_PER_TOKEN * max_tokens)
            key = text.key + (f"-max{max_tokens}" if max_tokens else "")
            with FileLock(str(Path(cache_dir) / f".{key}.lock")):  # the lock TextData trains tokenizers under
                tokenizer = cached_tokenizer(kind, batches, bpe_vocab_size, cache_dir, key)
        if complete:
            # Every shard listed must still be whole; a damaged one is prepared again below.
            manifest = write_token_shards(directory, [], tokenizer, identity, field)
            complete = set(manifest["done"]) >= set(SPLITS)
        if not complete:
            streams = streams or text.open()
            for stream in streams.values():  # a missing column or a source without text: refused before writing
                next(iter(stream()))
            passes = [TextPass("train", streams["train"], 0.0 if "validation" in streams else text.holdout)]
            if "validation" in streams:
                passes.append(TextPass("validation", streams["validation"]))
            processes = num_proc or available_cores()
            log.info("data: preparing token shards in %s (%d processes)", directory, processes)
            manifest = write_token_shards(
                directory, passes, tokenizer, identity, field, max_tokens=max_tokens, shard_tokens=shard_tokens,
                num_proc=processes, stop_after=stop_after,
            )
    log.info(
        "data: token shards in %s: %d training and %d validation tokens (%s)",
        directory, shard_tokens_of(manifest, "train"), shard_tokens_of(manifest, "validation"), manifest["dtype"],
    )
    return tokenizer, directory
