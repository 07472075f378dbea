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
as the tokenizer frames it (`midus.data.framing.frame_documents`: BOS where the tokenizer puts
one), then one EOS, in source order. `TokenBlocks` reads it as rows of ``block_size + 1`` tokens: row i is tokens
``[i * (block_size + 1), (i + 1) * (block_size + 1))`` of the split's stream with the shards
concatenated (OLMo-core's instances instead stop at each file's end), so only the stream's last
partial row is dropped. pack_documents drops the partial row at the end of every map batch
(`midus.data.packing.map_batch_size` documents), so the two give the same rows when a split fits
in one map batch; with more, pack_documents' rows after its first batch start later in the
stream than these (by the tokens dropped so far) and it has as many or fewer of them.

Writing them is `midus.data.token_shard_writer` (`write_token_shards`), which tokenises in worker
processes (`midus.data.token_shard_encoding`); this module holds what reading needs: the names
and manifest of a prepared directory, the token dtype, and `TokenBlocks`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "midus-token-shards"
VERSION = 1
SPLITS = ("train", "validation")
OWN_NAME = re.compile(r"^((train|validation)-\d{5}\.bin|manifest\.json|tokenizer)(\.partial)?$")
"""Names `midus.data.token_shard_writer` writes in a prepared directory; nothing else there is ever deleted."""


def token_dtype(tokenizer: PreTrainedTokenizerBase) -> np.dtype:
    """``uint16`` when every id of `tokenizer` (added tokens included) is below 2**16, else ``uint32``."""
    largest = max(tokenizer.get_vocab().values())
    return np.dtype(np.uint16 if largest < 2**16 else np.uint32)


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


def shard_tokens_of(manifest: dict[str, Any], split: str) -> int:
    """Tokens of `split` in the manifest's shards."""
    return sum(entry["tokens"] for entry in manifest["shards"] if entry["split"] == split)


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
        manifest = read_manifest(self.directory, "data.shards.directory")
        if manifest is None:
            raise FileNotFoundError(f"data.shards.directory: {str(self.directory)!r} holds no {MANIFEST}")
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
