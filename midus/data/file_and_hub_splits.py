"""Training text from local files or a Hugging Face dataset, loaded into `datasets`' Arrow cache.

Each loader returns a `DatasetDict` with ``train`` and ``validation`` splits holding one
``text`` column, plus a short corpus key that names the text in cache paths. Local files
and hub datasets go through `datasets.load_dataset`, which caches them under the data
cache; errors name the ``data.files.*`` / ``data.hub.*`` field that needs fixing. How .txt files become records, and
which records are kept, is `midus.data.text_records`; the same sources read as streams for
token shards are `midus.data.streamed_text`; the embedded corpus is `midus.data.embedded_splits`.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, Value

from midus.data.text_records import TEXT_RECORD_MODES, check_record_size, select_text, text_records

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# Cache-key marker of .txt paragraph records since `text_records` splits them: records split by
# `datasets` before (whitespace-holding blank lines ignored) must not be read back from the cache.
_PARAGRAPH_RECORDS_VERSION = "paragraph-records-v2"


def _generate_text_records(files: list[str], sample_by: str, stats: list[tuple[str, int, int]]) -> Iterator[dict]:
    """`Dataset.from_generator`'s generator: the records of `files` in order.

    `stats` (path, size, mtime of each file) is unused here: it is in the arguments so that the
    cache fingerprint that `datasets` hashes from them changes when a file does. Files without a
    record give one empty record: `datasets` refuses a generator that yields nothing (with a
    message naming no file), and the caller drops blank records and says which field holds no text.
    """
    records = 0
    for file in files:
        for record in text_records(file, sample_by):
            records += 1
            yield {"text": record}
    if not records:
        yield {"text": ""}


def short_hash(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def resolve_files(patterns: list[str], field_name: str) -> list[str]:
    """Expand globs; every entry must match at least one file with a supported suffix."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(Path(match).is_file() for match in matches):
            raise FileNotFoundError(f"{field_name}: {pattern!r} does not exist (or matches no file)")
        files.extend(matches)
    for file in files:
        _check_readable(file, field_name)
    suffixes = {Path(file).suffix for file in files}
    unknown = suffixes - set(FILE_BUILDERS)
    if unknown:
        raise ValueError(f"{field_name}: unsupported file type {sorted(unknown)}; expected .txt, .jsonl or .parquet")
    if len({FILE_BUILDERS[suffix] for suffix in suffixes}) > 1:
        raise ValueError(f"{field_name}: mixes file types {sorted(suffixes)}; use one type per split")
    return files


def _check_readable(file: str, field_name: str) -> None:
    """Refuse an unreadable or empty file by name (`datasets` fails on them without naming it)."""
    try:
        with open(file, "rb") as handle:
            empty = not handle.read(1)
    except OSError as error:
        raise ValueError(f"{field_name}: {file!r} cannot be read ({error.strerror or error})") from None
    if empty:
        raise ValueError(f"{field_name}: {file!r} is empty; expected a file of training text")


def _file_stats(files: list[str]) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime in ns) of each file: what cache keys of local files hash."""
    return [(str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in files]


def _load_files(files: list[str], text_field: str, sample_by: str, cache_dir: str, field_name: str) -> Dataset:
    builder = FILE_BUILDERS[Path(files[0]).suffix]
    options = {"sample_by": sample_by} if builder == "text" else {}
    where = f"{field_name} ({files[0]})" if len(files) == 1 else f"{field_name} ({len(files)} files from {files[0]})"
    hf_cache = str(Path(cache_dir) / "hf_datasets")
    try:
        if builder == "text" and sample_by in TEXT_RECORD_MODES:
            dataset = Dataset.from_generator(
                _generate_text_records,
                gen_kwargs={"files": files, "sample_by": sample_by, "stats": _file_stats(files)},
                features=Features({"text": Value("string")}),
                cache_dir=hf_cache,
            )
        else:
            dataset = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache, **options)
    except datasets.exceptions.DatasetGenerationError as error:
        # The message is generic ("An error occurred while generating the dataset"); its cause says what.
        cause = error.__cause__ or error
        raise ValueError(f"{where}: could not be read as {builder} ({type(cause).__name__}: {cause})") from error
    if builder == "text":
        check_record_size(dataset, sample_by, where)
    dataset = select_text(dataset, text_field, where)
    if len(dataset) == 0:
        raise ValueError(f"{where}: holds no text (every record is blank); expected training text")
    return dataset


def _split_off_validation(train: Dataset, val_fraction: float, seed: int, where: str, group: str) -> DatasetDict:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"data.{group}.val_fraction must be in (0, 1) when no validation split is given, got {val_fraction}"
        )
    if len(train) < 2:
        raise ValueError(f"{where}: needs at least 2 text records to split off validation, got {len(train)}")
    parts = train.train_test_split(test_size=val_fraction, seed=seed)
    return DatasetDict(train=parts["train"], validation=parts["test"])


def files_key_parts(
    train_paths: list[str], val_paths: list[str], text_field: str, sample_by: str, val_fraction: float, seed: int
) -> tuple:
    """What the corpus key of local files hashes: the files (path, size, mtime) and how they are read."""
    key_parts: tuple = (_file_stats(train_paths + val_paths), text_field, sample_by, val_fraction, seed)
    if sample_by == "paragraph" and any(FILE_BUILDERS[Path(p).suffix] == "text" for p in train_paths + val_paths):
        key_parts += (_PARAGRAPH_RECORDS_VERSION,)  # only here: every other key stays what it was
    return key_parts


def file_splits(
    train_files: list[str],
    val_files: list[str],
    val_fraction: float,
    text_field: str,
    sample_by: str,
    cache_dir: str,
    seed: int,
) -> tuple[DatasetDict, str]:
    """Local .txt / .jsonl / .parquet files; validation from `val_files` or split off.

    `sample_by` is ``data.files.sample_by``: how .txt files become records (``line``,
    ``paragraph``, ``article``, ``document``; see `text_records`); other files ignore it.
    """
    if not train_files:
        raise ValueError("data.files.train is empty; data.source=files needs at least one file")
    train_paths = resolve_files(train_files, "data.files.train")
    val_paths = resolve_files(val_files, "data.files.val") if val_files else []
    key = "files-" + short_hash(*files_key_parts(train_paths, val_paths, text_field, sample_by, val_fraction, seed))
    train = _load_files(train_paths, text_field, sample_by, cache_dir, "data.files.train")
    if val_paths:
        validation = _load_files(val_paths, text_field, sample_by, cache_dir, "data.files.val")
        return DatasetDict(train=train, validation=validation), key
    return _split_off_validation(train, val_fraction, seed, "data.files.train", "files"), key


def load_hub_dataset(name: str, config_name: str, train_split: str, offline_hint: str, **options: Any) -> Any:
    """``datasets.load_dataset(name, config_name, **options)`` with one error naming data.hub.dataset
    (and `offline_hint`, what to do without network) or data.hub.train_split."""
    if not name:
        raise ValueError("data.hub.dataset is empty; data.source=hub needs a dataset name")
    try:
        loaded = datasets.load_dataset(name, config_name or None, **options)
    except Exception as error:  # datasets raises many types for "offline" / "not found"
        raise ValueError(
            f"data.hub.dataset={name!r} could not be loaded ({type(error).__name__}: {error}). {offline_hint}"
        ) from error
    if train_split not in loaded:
        raise ValueError(f"data.hub.train_split={train_split!r} is not a split of {name!r}; it has {list(loaded)}")
    return loaded


def hub_splits(
    name: str,
    config_name: str,
    train_split: str,
    val_split: str,
    val_fraction: float,
    text_field: str,
    cache_dir: str,
    seed: int,
) -> tuple[DatasetDict, str]:
    """A dataset by Hugging Face hub name (or local dataset directory) via `load_dataset`."""
    loaded = load_hub_dataset(
        name, config_name, train_split,
        "If this machine is offline, load it once on a machine with network access (it is then cached "
        "under data/hf_datasets), or point data.source=files and data.files.train at local files.",
        cache_dir=str(Path(cache_dir) / "hf_datasets"),
    )
    where = f"dataset {name!r}"
    train = select_text(loaded[train_split], text_field, where, "data.hub.text_field")
    key = "hub-" + short_hash(name, config_name, train_split, val_split, text_field, val_fraction, seed)
    if val_split and val_split in loaded:
        validation = select_text(loaded[val_split], text_field, where, "data.hub.text_field")
        return DatasetDict(train=train, validation=validation), key
    return _split_off_validation(train, val_fraction, seed, where, "hub"), key
