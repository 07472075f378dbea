"""Token shards: a split's token ids written once, as flat binary files, and read back as blocks.

A prepared directory (`midus.data.prepare` names it and writes it; ``python -m midus prepare``
or the first ``fit`` with ``data.format: shards``)::

    manifest.json               what the directory holds; rewritten atomically after every shard
    tokenizer/                  the tokenizer whose ids the shards hold (``save_pretrained``)
    train-00000.bin ...         the training token stream, in order
    validation-00000.bin ...    the validation token stream, in order

A shard is raw token ids in native byte order, ``uint16`` when every id of the tokenizer is
below 65,536, else ``uint32``, with no header: nanoGPT's ``train.bin`` (its
``data/openwebtext/prepare.py`` writes one uint16 file that training reads with ``np.memmap``),
cut into files of at least `shard_tokens` tokens, as build-nanogpt's ``fineweb.py`` cuts its
uint16 shards and OLMo-core reads a list of flat numpy token files (``NumpyFSLDataset``). The
manifest records the dtype, since the files carry none.

The stream of a split is exactly what `midus.data.packing.pack_documents` packs: each document
as the tokenizer frames it (`frame_documents`: BOS where the tokenizer puts one), then one EOS,
in source order. `TokenBlocks` reads it as rows of ``block_size + 1`` tokens: row i is tokens
``[i * (block_size + 1), (i + 1) * (block_size + 1))`` of the split's stream with the shards
concatenated (OLMo-core's instances instead stop at each file's end), so only the stream's last
partial row is dropped. pack_documents drops the partial row at the end of every map batch
(`midus.data.packing.map_batch_size` documents), so the two give the same rows when a split fits
in one map batch; with more, pack_documents' rows after its first batch start later in the
stream than these (by the tokens dropped so far) and it has as many or fewer of them.

Writing is resumable: shards are written under a ``.partial`` name and renamed when complete,
and the manifest lists each with the number of source records read when it was closed. A rerun
checks the listed shards (a missing or short file, and every later shard of its pass, is made
again), skips the records already prepared without tokenising them, and continues; its result
is byte for byte an uninterrupted run's, for any number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets.utils import tqdm
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from midus.data.framing import frame_documents

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "midus-token-shards"
VERSION = 1
SPLITS = ("train", "validation")
OWN_NAME = re.compile(r"^((train|validation)-\d{5}\.bin|manifest\.json|tokenizer)(\.partial)?$")
"""Names this module writes in a prepared directory; nothing else there is ever deleted."""

UNIT_RECORDS = 1000
"""Records tokenised per task at most: the unit a process encodes, and where a shard may end."""
UNIT_CHARS = 1_000_000
"""Characters per task at most (long records make fewer per task), so a task's token lists stay a few MB."""


def token_dtype(tokenizer: PreTrainedTokenizerBase) -> np.dtype:
    """``uint16`` when every id of `tokenizer` (added tokens included) is below 2**16, else ``uint32``."""
    largest = max(tokenizer.get_vocab().values())
    return np.dtype(np.uint16 if largest < 2**16 else np.uint32)


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


class _Encoder:
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


_WORKER_ENCODER: _Encoder | None = None


def _start_worker(encoder: _Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(texts: dict[str, list[str]]) -> dict[str, np.ndarray]:
    return _WORKER_ENCODER(texts)


class _Done:
    """A result computed in this process, read like a pool's `AsyncResult`."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


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
def _encoded_in_order(
    units: Iterator[tuple[int, dict[str, list[str]]]], encoder: _Encoder, processes: int
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


def _units(
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


def read_manifest(directory: Path, field: str) -> dict[str, Any] | None:
    """The manifest of a prepared directory, None when it has none; `field` names the setting in errors."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{field}: {str(path)!r} is not a readable token-shard manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{field}: {str(path)!r} is not a manifest of {FORMAT} version {VERSION}; point {field} at another "
            "directory or delete this one"
        )
    return manifest


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)


def shard_tokens_of(manifest: dict[str, Any], split: str) -> int:
    """Tokens of `split` in the manifest's shards."""
    return sum(entry["tokens"] for entry in manifest["shards"] if entry["split"] == split)


def _check_shards(directory: Path, manifest: dict[str, Any]) -> None:
    """Keep the shards that are whole, drop the rest of their pass, delete files the manifest lacks.

    A shard whose file is missing or of another size is dropped with every later shard of its
    split. A pass feeding two splits closes a shard of each at once; it continues from the
    earlier of their last records, so shards past that point are dropped as well.
    """
    itemsize = np.dtype(manifest["dtype"]).itemsize
    kept: list[dict[str, Any]] = []
    broken: set[str] = set()
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        whole = path.is_file() and path.stat().st_size == entry["tokens"] * itemsize
        if entry["split"] in broken or not whole:
            if entry["split"] not in broken:
                log.warning("data: token shard %s is missing or incomplete; it is prepared again", path)
            broken.add(entry["split"])
            continue
        kept.append(entry)
    for name in {entry["pass"] for entry in manifest["shards"]}:
        ends = {entry["split"]: 0 for entry in manifest["shards"] if entry["pass"] == name}  # every split it feeds
        for entry in kept:
            if entry["pass"] == name:
                ends[entry["split"]] = entry["records"]
        resume = min(ends.values())
        kept = [entry for entry in kept if entry["pass"] != name or entry["records"] <= resume]
    dropped = {entry["pass"] for entry in manifest["shards"] if entry not in kept}  # such a pass is not done
    unfinished = {entry["split"] for entry in manifest["shards"] if entry["pass"] in dropped}
    manifest["done"] = [split for split in manifest["done"] if split not in unfinished]
    manifest["shards"] = kept
    listed = {entry["file"] for entry in kept}
    for path in directory.iterdir():  # shards of an interrupted run, and ones dropped above
        if path.is_file() and path.name not in listed and OWN_NAME.match(path.name) and ".bin" in path.name:
            path.unlink()


class _OpenShards:
    """The shards a pass is writing, one per split it feeds, under their ``.partial`` names."""

    def __init__(self, directory: Path, manifest: dict[str, Any], splits: tuple[str, ...]) -> None:
        self.entries = []
        self.handles = []
        for split in splits:
            number = sum(1 for entry in manifest["shards"] if entry["split"] == split)
            name = f"{split}-{number:05d}.bin"
            self.entries.append({"split": split, "file": name, "tokens": 0})
            self.handles.append(open(directory / (name + ".partial"), "wb"))
        self.directory = directory

    def write(self, arrays: dict[str, np.ndarray]) -> None:
        for entry, handle in zip(self.entries, self.handles):
            array = arrays[entry["split"]]
            handle.write(array.tobytes())
            entry["tokens"] += len(array)

    def tokens(self, split: str) -> int:
        return next(entry["tokens"] for entry in self.entries if entry["split"] == split)

    def close(self, pass_name: str, records: int) -> list[dict[str, Any]]:
        """Flush, sync and rename the files; their manifest entries."""
        for entry, handle in zip(self.entries, self.handles):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(self.directory / (entry["file"] + ".partial"), self.directory / entry["file"])
            entry.update({"pass": pass_name, "records": records})
        return self.entries

    def discard(self) -> None:
        for entry, handle in zip(self.entries, self.handles):
            handle.close()
            (self.directory / (entry["file"] + ".partial")).unlink(missing_ok=True)


def write_token_shards(
    directory: Path,
    passes: list[TextPass],
    tokenizer: PreTrainedTokenizerBase,
    identity: dict[str, Any],
    field: str,
    *,
    max_tokens: int = 0,
    shard_tokens: int = 1 << 26,
    num_proc: int = 1,
    unit_records: int = UNIT_RECORDS,
    unit_chars: int = UNIT_CHARS,
    stop_after: int = 0,
) -> dict[str, Any]:
    """Prepare (or finish preparing) the token shards of `passes` in `directory`; the manifest.

    Args:
        directory: the prepared directory (created).
        passes: the record streams, each written in order; a finished pass is not read again.
        tokenizer: encodes every document (`frame_documents`, then one EOS).
        identity: what the shards are of (text, tokenizer, budget); a manifest with another is
            refused, naming `field`.
        field: the setting that names the directory, for error messages.
        max_tokens: tokens per split at most (0: the whole stream): a pass stops there, mid-document.
        shard_tokens: a shard is closed once it holds this many tokens (at the end of a unit of
            work, so it holds at most one unit more). A resumed run keeps the manifest's value.
        num_proc: processes that tokenise (1: this one).
        unit_records, unit_chars: records and characters of one unit of work at most.
        stop_after: stop after this many shard writes, as an interruption would (0: never; for tests).
    """
    directory.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(directory, field)
    foreign = sorted(path.name for path in directory.iterdir() if not OWN_NAME.match(path.name))
    if manifest is None and foreign:
        raise ValueError(
            f"{field}: {str(directory)!r} holds other files ({', '.join(foreign[:3])}) and no token-shard "
            f"{MANIFEST}; point {field} at a new or empty directory"
        )
    if manifest is not None and manifest["identity"] != identity:
        differences = sorted(key for key in set(identity) | set(manifest["identity"])
                             if identity.get(key) != manifest["identity"].get(key))
        there = manifest["identity"]
        changes = ", ".join(f"{key}: {there.get(key)!r} there, {identity.get(key)!r} now" for key in differences)
        raise ValueError(
            f"{field}: {str(directory)!r} holds token shards prepared with other settings ({changes}); "
            f"point {field} at another directory or delete this one"
        )
    dtype = token_dtype(tokenizer)
    if manifest is None:
        manifest = {
            "format": FORMAT, "version": VERSION, "identity": identity, "dtype": dtype.name,
            "byteorder": "little" if np.little_endian else "big",
            "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "shard_tokens": shard_tokens, "shards": [], "done": [],
        }
        _write_json(directory / MANIFEST, manifest)
    else:
        before = json.dumps(manifest)
        _check_shards(directory, manifest)
        if json.dumps(manifest) != before:  # a complete directory that is whole is left untouched
            _write_json(directory / MANIFEST, manifest)
    _save_tokenizer(directory, tokenizer)
    encoder = _Encoder(tokenizer, dtype)
    written = 0
    for text_pass in passes:
        if set(text_pass.splits) <= set(manifest["done"]):
            continue
        written, stopped = _write_pass(
            directory, manifest, text_pass, encoder, max_tokens, manifest["shard_tokens"], num_proc,
            unit_records, unit_chars, written, stop_after,
        )
        if stopped:
            break
    return manifest


def _write_pass(
    directory: Path, manifest: dict[str, Any], text_pass: TextPass, encoder: _Encoder, max_tokens: int,
    shard_tokens: int, num_proc: int, unit_records: int, unit_chars: int, written: int, stop_after: int,
) -> tuple[int, bool]:
    """Write `text_pass` from where the manifest says it stopped; (shard writes so far, stopped early)."""
    ours = [entry for entry in manifest["shards"] if entry["pass"] == text_pass.name]
    start = ours[-1]["records"] if ours else 0
    main = text_pass.name
    prepared = shard_tokens_of(manifest, main)
    progress = tqdm(
        total=max_tokens or None, initial=prepared, unit="tok", unit_scale=True,
        desc=f"preparing {'training' if main == 'train' else 'validation'} token shards",
    )

    def commit(shards: _OpenShards, records: int, done: bool) -> None:
        manifest["shards"].extend(shards.close(main, records))
        if done:
            manifest["done"].extend(text_pass.splits)
        _write_json(directory / MANIFEST, manifest)

    units = _units(text_pass, start, unit_records, unit_chars)
    try:
        # Worker processes start before any shard file is open, so they inherit none.
        with _encoded_in_order(units, encoder, num_proc) as encoded:
            shards = _OpenShards(directory, manifest, text_pass.splits)
            try:
                for records, arrays in encoded:
                    finished = False
                    if max_tokens and prepared + len(arrays[main]) >= max_tokens:
                        arrays[main] = arrays[main][: max_tokens - prepared]
                        finished = True
                    shards.write(arrays)
                    prepared += len(arrays[main])
                    progress.update(len(arrays[main]))
                    if finished or shards.tokens(main) >= shard_tokens:
                        commit(shards, records, finished)
                        written += 1
                        if finished:
                            return written, False
                        if stop_after and written >= stop_after:
                            return written, True
                        shards = _OpenShards(directory, manifest, text_pass.splits)
                if any(entry["tokens"] for entry in shards.entries):
                    commit(shards, records, True)
                    written += 1
                    return written, False
            except BaseException:
                shards.discard()
                raise
            shards.discard()  # the stream ended right after the last shard: nothing left to write
            manifest["done"].extend(text_pass.splits)
            _write_json(directory / MANIFEST, manifest)
            return written, False
    finally:
        progress.close()


def _save_tokenizer(directory: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokenizer beside the shards (written once, renamed into place when complete)."""
    target = directory / TOKENIZER_DIR
    if target.is_dir():
        return
    partial = directory / (TOKENIZER_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(str(partial))
    os.replace(partial, target)


def stored_tokenizer(directory: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer a prepared directory's shards were made with, None when it holds none."""
    target = Path(directory) / TOKENIZER_DIR
    if not (target / "tokenizer.json").is_file():
        return None
    return PreTrainedTokenizerFast.from_pretrained(str(target))


class TokenBlocks(Dataset):
    """Rows of ``block_size + 1`` tokens over a split's memory-mapped token shards, read as
    `pack_documents`' blocks are: ``blocks[i]`` is ``{"input_ids": LongTensor[block_size + 1]}``,
    and a slice or list of indices gives them stacked.

    Memory maps are opened on first use in each process (a DataLoader worker opens its own).

    Args:
        directory: a prepared directory whose manifest has the split complete.
        split: ``train`` or ``validation``.
        block_size: tokens per training sequence; a row holds one more (inputs and shifted targets).
    """

    def __init__(self, directory: str | Path, split: str, block_size: int) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory, "data.prepared_dir")
        if manifest is None:
            raise FileNotFoundError(f"data.prepared_dir: {str(self.directory)!r} holds no {MANIFEST}")
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<" if manifest["byteorder"] == "little" else ">")
        shards = [entry for entry in manifest["shards"] if entry["split"] == split and entry["tokens"]]
        self.files = [self.directory / entry["file"] for entry in shards]
        self.starts = np.cumsum([0] + [entry["tokens"] for entry in shards])
        self.tokens = int(self.starts[-1])
        """Tokens of the split's stream."""
        self.row = block_size + 1
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return self.tokens // self.row

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # a worker process maps the files itself

    def _stream(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` of the split's stream (across shard boundaries)."""
        if self._maps is None:
            self._maps = [np.memmap(path, dtype=self.dtype, mode="r") for path in self.files]
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        shard = first
        while start < end:
            offset = start - self.starts[shard]
            take = min(end, self.starts[shard + 1]) - start
            pieces.append(self._maps[shard][offset : offset + take])
            start += take
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _rows(self, first: int, count: int) -> torch.Tensor:
        ids = self._stream(first * self.row, (first + count) * self.row).astype(np.int64)
        return torch.from_numpy(ids).view(count, self.row)

    def __getitem__(self, index: int | slice | Iterable[int]) -> dict[str, torch.Tensor]:
        if isinstance(index, slice):
            first, stop, step = index.indices(len(self))
            if step == 1:
                return {"input_ids": self._rows(first, max(0, stop - first))}
            index = range(first, stop, step)
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            position = int(index)
            if position < 0:
                position += len(self)
            if not 0 <= position < len(self):
                raise IndexError(f"block {int(index)} of {len(self)}")
            return {"input_ids": self._rows(position, 1)[0]}
        rows = [self[int(position)]["input_ids"] for position in index]
        return {"input_ids": torch.stack(rows) if rows else torch.empty(0, self.row, dtype=torch.long)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for position in range(len(self)):
            yield self[position]
