"""Tokenising a stream of records for token shards: passes over the records, units of work, and
the worker processes that encode them in order.

A `TextPass` is one ordered read of a source's records; with a holdout, `held_out` picks the
records that go to validation by their index alone. `work_units` cuts the stream into units of
at most `UNIT_RECORDS` records and `UNIT_CHARS` characters, and `encoded_in_order` encodes them
(`DocumentEncoder`: each document as the tokenizer frames it, then one EOS) in worker processes,
returning the units' token arrays in stream order. `midus.data.token_shard_writer` writes them.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from midus.data.framing import frame_documents
from midus.data.token_shards import SPLITS

UNIT_RECORDS = 1000
"""Records tokenised per task at most: the unit a process encodes, and where a shard may end."""
UNIT_CHARS = 1_000_000
"""Characters per task at most (long records make fewer per task), so a task's token lists stay a few MB."""


def held_out(index: int, fraction: float) -> bool:
    """Whether record `index` of a stream is validation when `fraction` of it is held out.

    The first record is, then every record that raises ``ceil(records read * fraction)``: of the
    first n records exactly ``ceil(n * fraction)`` are held out, spread evenly, decided by the
    index alone (a stream has no length to split by, and a resume needs the same split).
    """
    return math.ceil((index + 1) * fraction) > math.ceil(index * fraction)


@dataclass(frozen=True)
class TextPass:
    """One ordered read of a source's records, feeding its split (`name`), or with `holdout`
    the training split and, for the records `held_out` picks, the validation split."""

    name: str
    """``train`` or ``validation``: the split the records go to (with `holdout`: ``train``)."""
    records: Callable[[], Iterable[str]]
    """Opens the record stream, from its first record (called again by a resumed run)."""
    holdout: float = 0.0
    """Share of the records held out as validation (0: none)."""

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.holdout else (self.name,)


class DocumentEncoder:
    """Token ids of a task's documents as flat arrays, one per split: the packed stream's pieces."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, dtype: np.dtype) -> None:
        self.tokenizer, self.dtype, self.eos = tokenizer, dtype, tokenizer.eos_token_id

    def __call__(self, texts: dict[str, list[str]]) -> dict[str, np.ndarray]:
        names = list(texts)
        ids = iter(frame_documents(self.tokenizer, [text for name in names for text in texts[name]]))
        arrays = {}
        for name in names:
            stream: list[int] = []
            for _ in texts[name]:
                stream.extend(next(ids))
                stream.append(self.eos)  # one EOS after every document, as pack_documents
            arrays[name] = np.array(stream, dtype=self.dtype)
        return arrays


_WORKER_ENCODER: DocumentEncoder | None = None


def _start_worker(encoder: DocumentEncoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(texts: dict[str, list[str]]) -> dict[str, np.ndarray]:
    return _WORKER_ENCODER(texts)


@contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM=false`` while worker processes start: each worker then encodes on
    one thread (one process per core) and `tokenizers` prints no fork warning; this process's
    setting comes back afterwards."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


@contextmanager
def encoded_in_order(
    units: Iterator[tuple[int, dict[str, list[str]]]], encoder: DocumentEncoder, processes: int
) -> Iterator[Iterator[tuple[int, dict[str, np.ndarray]]]]:
    """``(records read, arrays)`` of each unit of `units`, in the units' order, encoded by
    `processes` worker processes (in this one when 1).

    Why not `datasets`' own parallel map: ``Dataset.map(num_proc=...)`` needs the text converted
    into Arrow first and writes its result as another Arrow cache (two copies of the corpus that
    shards exist to avoid), and a streamed ``IterableDataset.map`` runs in one process. A pool
    over ordered chunks of the stream is what build-nanogpt's ``fineweb.py`` does; unlike its
    ``Pool.imap``, which reads its whole input ahead, at most two tasks per process are in flight
    here, so memory stays flat however long the stream.
    """
    if processes <= 1:
        yield ((end, encoder(texts)) for end, texts in units)
        return
    with _single_threaded_tokenizers():
        pool = multiprocessing.get_context().Pool(processes, initializer=_start_worker, initargs=(encoder,))

    def results() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        pending: deque = deque()
        for end, texts in units:
            pending.append((end, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 2 * processes:
                end, result = pending.popleft()
                yield end, result.get()
        while pending:
            end, result = pending.popleft()
            yield end, result.get()

    try:
        yield results()
    finally:
        pool.terminate()
        pool.join()


def work_units(
    text_pass: TextPass, start: int, unit_records: int, unit_chars: int
) -> Iterator[tuple[int, dict[str, list[str]]]]:
    """``(records read after it, texts by split)`` of consecutive records from record `start` on.

    The records before `start` are read and dropped (not tokenised). Units restart at `start`,
    which is always where a unit ended, so a resumed run cuts the rest of the stream exactly as
    an uninterrupted one.
    """
    texts: dict[str, list[str]] = {split: [] for split in text_pass.splits}
    count = chars = 0
    index = -1
    for index, text in enumerate(text_pass.records()):
        if index < start:
            continue
        split = "validation" if text_pass.holdout and held_out(index, text_pass.holdout) else text_pass.name
        texts[split].append(text)
        count, chars = count + 1, chars + len(text)
        if count >= unit_records or chars >= unit_chars:
            yield index + 1, texts
            texts = {split: [] for split in text_pass.splits}
            count = chars = 0
    if count:
        yield index + 1, texts
