"""A run's text read as streams of records, for token shards: the embedded corpus, local files,
or a Hugging Face dataset with ``streaming=True``.

`StreamedText` is what `midus.data.prepare` reads while it writes token shards, instead of the
`DatasetDict` splits (`midus.data.embedded_splits`, `midus.data.file_and_hub_splits`) converted
into `datasets`' Arrow cache first. Records are kept as those splits keep them
(`midus.data.text_records`); without a validation split, a share of the training stream is held
out as it streams past (`midus.data.token_shard_encoding.held_out`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from midus.data.file_and_hub_splits import FILE_BUILDERS, files_key_parts, load_hub_dataset, resolve_files, short_hash
from midus.data.text_records import TEXT_RECORD_MODES, stream_records, text_records


@dataclass(frozen=True)
class StreamedText:
    """A run's text as ordered streams of records, read while token shards are prepared
    (`midus.data.prepare`) instead of converted into `datasets`' Arrow cache first.

    Nothing is read until `open` is called, and a prepared directory that is complete needs no
    text at all (a hub dataset is then not even resolved).
    """

    key: str
    """Names the text in cache paths, as the corpus keys of `embedded_key`, `file_splits` and `hub_splits`."""
    open: Callable[[], dict[str, Callable[[], Iterable[str]]]]
    """Resolves the source: a function opening the record stream of ``train``, and of
    ``validation`` when the source has validation text of its own."""
    holdout: float
    """Share of the training stream held out as validation when `open` gives no ``validation``."""


def _texts(dataset: Dataset) -> Iterator[str]:
    for batch in dataset.iter(batch_size=1000):
        yield from batch["text"]


def streamed_embedded(splits: DatasetDict, key: str) -> StreamedText:
    """The embedded corpus's splits (`embedded_splits`, in memory) as streams, in their order."""
    streams = {name: (lambda split=splits[name]: _texts(split)) for name in ("train", "validation")}
    return StreamedText(key, lambda: streams, 0.0)


def _file_rows(files: list[str], sample_by: str) -> Iterable[dict]:
    """The rows of `files` in order, as `file_splits` reads them, streamed (no Arrow copy)."""
    builder = FILE_BUILDERS[Path(files[0]).suffix]
    if builder == "text" and sample_by in TEXT_RECORD_MODES:
        return ({"text": record} for file in files for record in text_records(file, sample_by))
    options = {"sample_by": sample_by} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **options)


def streamed_files(
    train_files: list[str],
    val_files: list[str],
    val_fraction: float,
    text_field: str,
    sample_by: str,
    seed: int,
) -> StreamedText:
    """Local .txt / .jsonl / .parquet files read record by record, in file order.

    The files are checked (they exist, can be read, are of one type) at once. Without
    `val_files`, `val_fraction` of the training records are held out as they stream past
    (`midus.data.token_shard_encoding.held_out`), not by `file_splits`' seeded shuffle, so the key
    differs from `file_splits`'; with `val_files` it is the same (the same text, so a trained
    tokenizer is shared).
    """
    if not train_files:
        raise ValueError("data.files.train is empty; data.source=files needs at least one file")
    train_paths = resolve_files(train_files, "data.files.train")
    val_paths = resolve_files(val_files, "data.files.val") if val_files else []
    if not val_paths and not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"data.files.val_fraction must be in (0, 1) when no validation split is given, got {val_fraction}"
        )
    # With validation files the text is file_splits' and so is the key; the streamed holdout does
    # not depend on data.files.seed, so its key does not either (a new seed prepares nothing again).
    key_seed = seed if val_paths else 0
    key_parts = files_key_parts(train_paths, val_paths, text_field, sample_by, val_fraction, key_seed)
    key = "files-" + short_hash(*key_parts, *(() if val_paths else ("streamed-holdout",)))

    def stream(paths: list[str], field_name: str) -> Callable[[], Iterator[str]]:
        where = f"{field_name} ({paths[0]})" if len(paths) == 1 else (
            f"{field_name} ({len(paths)} files from {paths[0]})"
        )
        builder = FILE_BUILDERS[Path(paths[0]).suffix]
        return lambda: stream_records(
            _file_rows(paths, sample_by), text_field, where, builder, sample_by if builder == "text" else None
        )

    streams = {"train": stream(train_paths, "data.files.train")}
    if val_paths:
        streams["validation"] = stream(val_paths, "data.files.val")
    return StreamedText(key, lambda: streams, 0.0 if val_paths else val_fraction)


def streamed_hub(
    name: str,
    config_name: str,
    train_split: str,
    val_split: str,
    val_fraction: float,
    text_field: str,
) -> StreamedText:
    """A dataset by hub name (or local dataset directory) read with ``load_dataset(streaming=True)``:
    nothing is downloaded whole or converted; records arrive in the dataset's order.

    Without `val_split` among its splits, `val_fraction` of the training records are held out as
    they stream past (`midus.data.token_shard_encoding.held_out`), so the key is not `hub_splits`'. The
    key is made without contacting the hub (a prepared directory is found offline).
    """
    if not name:
        raise ValueError("data.hub.dataset is empty; data.source=hub needs a dataset name")
    key = "hub-" + short_hash(name, config_name, train_split, val_split, text_field, val_fraction, "streamed")
    where = f"dataset {name!r}"

    def open_streams() -> dict[str, Callable[[], Iterator[str]]]:
        loaded = load_hub_dataset(
            name, config_name, train_split,
            "If this machine is offline, prepare the shards where the hub is reachable (python -m midus prepare) "
            "and copy data.shards.directory here, or point data.source=files and data.files.train at local files.",
            streaming=True,
        )
        def records(split: str) -> Iterator[str]:
            return stream_records(loaded[split], text_field, where, "a dataset", field_name="data.hub.text_field")

        streams = {"train": lambda: records(train_split)}
        if val_split and val_split in loaded:
            streams["validation"] = lambda: records(val_split)
        elif not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"data.hub.val_fraction must be in (0, 1) when no validation split is given, got {val_fraction} "
                f"({name!r} has no split {val_split!r})"
            )
        return streams

    return StreamedText(key, open_streams, val_fraction)
