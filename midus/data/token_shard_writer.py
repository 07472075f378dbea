"""Writing token shards (`midus.data.token_shards` describes the format): `write_token_shards`.

Writing is resumable: shards are written under a ``.partial`` name and renamed when complete,
and the manifest lists each with the number of source records read when it was closed. A rerun
checks the listed shards (a missing or short file, and every later shard of its pass, is made
again), skips the records already prepared without tokenising them, and continues; its result
is byte for byte an uninterrupted run's, for any number of processes.

Records are tokenised by `midus.data.token_shard_encoding`; this module checks what a prepared
directory already holds, writes shards and the manifest, and stores the tokenizer beside them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from datasets.utils import tqdm
from transformers import PreTrainedTokenizerBase

from midus.data.token_shard_encoding import (
    UNIT_CHARS,
    UNIT_RECORDS,
    DocumentEncoder,
    TextPass,
    encoded_in_order,
    work_units,
)
from midus.data.token_shards import (
    FORMAT,
    MANIFEST,
    OWN_NAME,
    TOKENIZER_DIR,
    VERSION,
    read_manifest,
    shard_tokens_of,
    token_dtype,
)

log = logging.getLogger(__name__)


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)


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
    encoder = DocumentEncoder(tokenizer, dtype)
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
    directory: Path, manifest: dict[str, Any], text_pass: TextPass, encoder: DocumentEncoder, max_tokens: int,
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

    units = work_units(text_pass, start, unit_records, unit_chars)
    try:
        # Worker processes start before any shard file is open, so they inherit none.
        with encoded_in_order(units, encoder, num_proc) as encoded:
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
