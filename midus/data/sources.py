"""Where training text comes from: the embedded corpus, local files, or a Hugging Face dataset.

Each loader returns a `DatasetDict` with ``train`` and ``validation`` splits holding one
``text`` column, plus a short corpus key that names the text in cache paths. Local files
and hub datasets go through `datasets.load_dataset`, which caches them under the data
cache; errors name the `data.*` field that needs fixing.

Plain-text files become records in one of four ways (``data.text_sample_by``): ``line`` and
``document`` are `datasets`' text builder as is; ``paragraph`` and ``article`` are split here
(`text_records`), because `datasets`' own paragraph split only knows an exactly empty line
(``"\\n\\n"``): a WikiText file, whose blank lines hold a space, was one record of the whole
file, and one tokenizer call of 22 MB took 3.5-4.1 GB.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, Value

from midus.data.corpus import BiographyCorpus

log = logging.getLogger(__name__)

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

TEXT_RECORD_MODES = ("paragraph", "article")
"""``data.text_sample_by`` values whose .txt records `text_records` makes (the others: `datasets`)."""

MAX_RECORD_CHARS = 1_000_000
"""Longest .txt record accepted, in characters. Packing tokenizes records in batches of whole
records; the kit's BPE took about 200 bytes of memory per character of one call (a record of
22 MB of WikiText: 4.1 GB; of 1.1 MB: 270 MB), so a record of this size costs about 200 MB. A
longer record means that ``data.text_sample_by`` did not find the file's record boundaries
(``paragraph``, ``article``, ``line``: an error) or that whole files were asked for
(``document``: a warning)."""

# Cache-key marker of .txt paragraph records since `text_records` splits them: records split by
# `datasets` before (whitespace-holding blank lines ignored) must not be read back from the cache.
_PARAGRAPH_RECORDS_VERSION = "paragraph-records-v2"


def is_blank_line(line: str) -> bool:
    """Whether a line separates paragraphs: empty or whitespace only (WikiText's hold a space)."""
    return not line.strip()


def is_article_heading(line: str) -> bool:
    """Whether a line is a top-level WikiText heading (`` = Title = ``, not `` = = Section = = ``).

    The test of lm-evaluation-harness's wikitext task (its `EleutherAI/wikitext_document_level`
    pages): the line with ``= = =`` and then ``= =`` collapsed (``== Section ==``) and stripped
    starts with ``"= "`` and ends with ``" ="``.
    """
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def _without_blank_ends(lines: list[str]) -> str:
    """`lines` joined by newlines, less the blank lines at either end ("" when all are blank)."""
    start, end = 0, len(lines)
    while start < end and is_blank_line(lines[start]):
        start += 1
    while end > start and is_blank_line(lines[end - 1]):
        end -= 1
    return "\n".join(lines[start:end])


def text_records(path: str, sample_by: str) -> Iterator[str]:
    """The records of one .txt file, read line by line (one record in memory at a time).

    * ``paragraph``: each run of non-blank lines (`is_blank_line`: whitespace-only lines are
      blank too), its lines joined by ``\\n`` as in the file.
    * ``article``: each top-level WikiText heading (`is_article_heading`) starts a record that
      runs to the next one, its blank lines and sub-headings included, less the blank lines at
      its ends; non-blank text before the first heading is a record of its own. These are
      lm-evaluation-harness's wikitext pages (blank ends aside). A file without a heading is one
      record.

    Lines are read as `datasets` reads them: UTF-8, universal newlines.
    """
    if sample_by not in TEXT_RECORD_MODES:
        raise ValueError(f"data.text_sample_by={sample_by!r}: text_records splits {' or '.join(TEXT_RECORD_MODES)}")
    lines: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.removesuffix("\n")
            if sample_by == "paragraph":
                if not is_blank_line(line):
                    lines.append(line)
                elif lines:
                    yield "\n".join(lines)
                    lines = []
                continue
            if lines and is_article_heading(line):
                record = _without_blank_ends(lines)
                if record:
                    yield record
                lines = []
            lines.append(line)
    record = _without_blank_ends(lines)
    if record:
        yield record


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


def _short_hash(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def embedded_splits(
    corpus: BiographyCorpus,
    replay: BiographyCorpus | None = None,
    replay_share: float = 0.0,
    replay_validation: bool = True,
) -> DatasetDict:
    """Training biographies and held-out-template biographies of the same people.

    With a `replay` population, training text is every document of `corpus` plus a subset of
    the replay population's documents (see `replay_counts`) making `replay_share` of the mix,
    shuffled together deterministically; validation text is the held-out-template biographies
    of both populations (main first, then replay, one per person), so ``val/loss`` covers both;
    with ``replay_validation=False`` the main population's alone.
    People of `corpus` whose name also occurs in `replay` are left out of the main population
    (see `shared_names`).
    """
    if replay is None:
        return DatasetDict(
            train=Dataset.from_dict({"text": corpus.train_documents()}),
            validation=Dataset.from_dict({"text": corpus.validation_documents()}),
        )
    shared = shared_names(corpus, replay)
    kept = [person.name not in shared for person in corpus.people]
    main_train = corpus.train_documents([corpus.docs_per_person if keep else 0 for keep in kept])
    counts = replay_counts(len(replay.people), len(main_train), replay.docs_per_person, replay_share)
    replay_train = replay.train_documents(counts)
    train = main_train + replay_train
    mix = (corpus.seed, len(corpus.people), corpus.docs_per_person, replay.seed, len(replay.people), replay_share)
    if replay.docs_per_person != corpus.docs_per_person:  # only then: every earlier mix keeps its order
        mix += (replay.docs_per_person,)
    random.Random(f"midus.text.replay_mix:{mix}").shuffle(train)
    validation = [doc for doc, keep in zip(corpus.validation_documents(), kept) if keep]
    log.info(
        "embedded corpus: %d documents of population %d and %d of replay population %d (share %.4f)",
        len(main_train), corpus.seed, len(replay_train), replay.seed, len(replay_train) / len(train),
    )
    return DatasetDict(
        train=Dataset.from_dict({"text": train}),
        validation=Dataset.from_dict(
            {"text": validation + (replay.validation_documents() if replay_validation else [])}
        ),
    )


def shared_names(corpus: BiographyCorpus, replay: BiographyCorpus) -> set[str]:
    """Names of people in both populations.

    Different seeds share a name only by chance (about n_main * n_replay / 2.4e8 names are
    expected to collide, e.g. 1.7e-4 for 200 x 200). Such people are dropped from the MAIN
    population, deterministically: the replay population stays exactly the one a base model
    was trained on, and the main population holds only people that are new to it.
    """
    return {person.name for person in corpus.people} & {person.name for person in replay.people}


def replay_counts(replay_people: int, main_documents: int, docs_per_person: int, share: float) -> list[int]:
    """Training documents per replay person (population order) so replay is `share` of the mix.

    ``R = round(share / (1 - share) * main_documents)`` replay documents, spread evenly: each
    person gets ``R // replay_people``, the first ``R % replay_people`` people one more. Every
    replay person keeps at least one document and at most the `docs_per_person` it has, so
    ``replay_people <= R <= replay_people * docs_per_person``; otherwise a ValueError names
    ``data.embedded.replay_share`` and the shares that fit.
    """
    total = round(share / (1.0 - share) * main_documents)
    if not replay_people <= total <= replay_people * docs_per_person:
        low = replay_people / (main_documents + replay_people)
        high = replay_people * docs_per_person / (main_documents + replay_people * docs_per_person)
        raise ValueError(
            f"data.embedded.replay_share={share} asks for {total} replay documents next to {main_documents} "
            f"main ones, but each of the {replay_people} replay people needs at least 1 and has at most "
            f"{docs_per_person} (data.embedded.docs_per_person); use a share in about [{low:.4f}, {high:.4f}] "
            "or change data.embedded.replay_num_people"
        )
    base, extra = divmod(total, replay_people)
    return [base + 1 if index < extra else base for index in range(replay_people)]


def embedded_key(
    seed: int,
    num_people: int,
    docs_per_person: int,
    replay_seed: int = -1,
    replay_num_people: int = 0,
    replay_share: float = 0.0,
    replay_docs_per_person: int = 0,
    replay_validation: bool = True,
) -> str:
    """Cache key of an embedded corpus (its text is a pure function of these).

    Without replay (``replay_seed`` < 0) the replay arguments are ignored and the key is
    ``biographies-s{seed}-n{num_people}-d{docs_per_person}``; with replay it gains
    ``-replay-s{replay_seed}-n{people}-p{share}`` (``replay_num_people`` 0 counts as
    `num_people`, so both spellings of one mix share a key), then ``-d{replay_docs_per_person}``
    when that differs from `docs_per_person` and ``-valnew`` when validation leaves the replay
    population out (the defaults add nothing: earlier keys stay valid).
    """
    key = f"biographies-s{seed}-n{num_people}-d{docs_per_person}"
    if replay_seed >= 0:
        key += f"-replay-s{replay_seed}-n{replay_num_people or num_people}-p{float(replay_share)!r}"
        if replay_docs_per_person and replay_docs_per_person != docs_per_person:
            key += f"-d{replay_docs_per_person}"
        if not replay_validation:
            key += "-valnew"
    return key


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
        _check_record_size(dataset, sample_by, where)
    dataset = _select_text(dataset, text_field, where)
    if len(dataset) == 0:
        raise ValueError(f"{where}: holds no text (every record is blank); expected training text")
    return dataset


def _check_record_size(dataset: Dataset, sample_by: str, where: str) -> None:
    """Refuse (warn of, for ``document``) a .txt record over `MAX_RECORD_CHARS` characters, naming
    ``data.text_sample_by``: one tokenizer call of it would take gigabytes."""
    if len(dataset) == 0:
        return
    lengths = pc.utf8_length(dataset.data.column("text"))  # Arrow: no pass over the text in Python
    longest = pc.max(lengths).as_py() or 0
    if longest <= MAX_RECORD_CHARS:
        return
    index = pc.index(lengths, longest).as_py()
    _long_record(sample_by, where, longest, index, dataset[index]["text"])


def _long_record(sample_by: str, where: str, longest: int, index: int, text: str) -> None:
    """Warn of (``document``) or refuse record `index` of `where`, `longest` characters long."""
    start = " ".join(text[:60].split())
    if sample_by == "document":
        log.warning(
            "data.text_sample_by=document: %s holds a file of %s characters (record %d, starting %r); one "
            "tokenizer call of it takes about %.1f GB (about 200 bytes a character). For less memory, "
            "split the text into records: data.text_sample_by=paragraph (blank lines), article (WikiText "
            "headings) or line", where, f"{longest:,}", index, start, longest * 200 / 1e9,
        )
        return
    hints = {
        "paragraph": "the file has no blank lines between paragraphs; use data.text_sample_by=line for a record "
                     "per line, or article for WikiText files",
        "article": "the file has no top-level WikiText heading (' = Title = ') in that stretch; use "
                   "data.text_sample_by=paragraph (blank lines) or line",
        "line": "the file has a line that long; split it into lines",
    }
    raise ValueError(
        f"data.text_sample_by={sample_by}: {where} gives a record of {longest:,} characters (record {index}, "
        f"starting {start!r}), over the {MAX_RECORD_CHARS:,} a record may hold (one tokenizer call takes about "
        f"200 bytes a character): {hints.get(sample_by, 'split the text into smaller records')}"
    )


def _select_text(dataset: Dataset, text_field: str, where: str) -> Dataset:
    if text_field not in dataset.column_names:
        raise ValueError(
            f"data.text_field={text_field!r} is not a column of {where}; its columns are {dataset.column_names}"
        )
    dataset = dataset.select_columns([text_field])
    if text_field != "text":
        dataset = dataset.rename_column(text_field, "text")
    return dataset.filter(lambda row: bool(row["text"] and row["text"].strip()))


def _split_off_validation(train: Dataset, val_fraction: float, seed: int, where: str) -> DatasetDict:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1) when no validation split is given, got {val_fraction}")
    if len(train) < 2:
        raise ValueError(f"{where}: needs at least 2 text records to split off validation, got {len(train)}")
    parts = train.train_test_split(test_size=val_fraction, seed=seed)
    return DatasetDict(train=parts["train"], validation=parts["test"])


def _files_key_parts(
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

    `sample_by` is ``data.text_sample_by``: how .txt files become records (``line``,
    ``paragraph``, ``article``, ``document``; see `text_records`); other files ignore it.
    """
    if not train_files:
        raise ValueError("data.train_files is empty; data.source=files needs at least one file")
    train_paths = resolve_files(train_files, "data.train_files")
    val_paths = resolve_files(val_files, "data.val_files") if val_files else []
    key = "files-" + _short_hash(*_files_key_parts(train_paths, val_paths, text_field, sample_by, val_fraction, seed))
    train = _load_files(train_paths, text_field, sample_by, cache_dir, "data.train_files")
    if val_paths:
        validation = _load_files(val_paths, text_field, sample_by, cache_dir, "data.val_files")
        return DatasetDict(train=train, validation=validation), key
    return _split_off_validation(train, val_fraction, seed, "data.train_files"), key


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
    if not name:
        raise ValueError("data.hub_dataset is empty; data.source=hub needs a dataset name")
    try:
        loaded = datasets.load_dataset(name, config_name or None, cache_dir=str(Path(cache_dir) / "hf_datasets"))
    except Exception as error:  # datasets raises many types for "offline" / "not found"
        raise ValueError(
            f"data.hub_dataset={name!r} could not be loaded ({type(error).__name__}: {error}). "
            "If this machine is offline, load it once on a machine with network access (it is then cached "
            "under data/hf_datasets), or point data.source=files and data.train_files at local files."
        ) from error
    if train_split not in loaded:
        raise ValueError(f"data.hub_train_split={train_split!r} is not a split of {name!r}; it has {list(loaded)}")
    where = f"dataset {name!r}"
    train = _select_text(loaded[train_split], text_field, where)
    key = "hub-" + _short_hash(name, config_name, train_split, val_split, text_field, val_fraction, seed)
    if val_split and val_split in loaded:
        return DatasetDict(train=train, validation=_select_text(loaded[val_split], text_field, where)), key
    return _split_off_validation(train, val_fraction, seed, where), key


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


def _stream_records(
    rows: Iterable[dict], text_field: str, where: str, reading: str, sample_by: str | None = None
) -> Iterator[str]:
    """The non-blank `text_field` of each row, as `_select_text` keeps them; read errors name `where`.

    With `sample_by` (a .txt file), a record over `MAX_RECORD_CHARS` is refused (warned of for
    ``document``) as `_check_record_size` does.
    """
    iterator = iter(rows)
    index = kept = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            if not kept:
                raise ValueError(f"{where}: holds no text (every record is blank); expected training text") from None
            return
        except Exception as error:  # pyarrow, json, fsspec, decoding: the cause says what
            raise ValueError(f"{where}: could not be read as {reading} ({type(error).__name__}: {error})") from error
        if text_field not in row:
            raise ValueError(f"data.text_field={text_field!r} is not a column of {where}; its columns are {list(row)}")
        text = row[text_field]
        if sample_by is not None and len(text) > MAX_RECORD_CHARS:
            _long_record(sample_by, where, len(text), index, text)
        index += 1
        if text and text.strip():
            kept += 1
            yield text


def _file_rows(files: list[str], sample_by: str) -> Iterable[dict]:
    """The rows of `files` in order, as `_load_files` reads them, streamed (no Arrow copy)."""
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
    (`midus.data.token_shards.held_out`), not by `file_splits`' seeded shuffle, so the key
    differs from `file_splits`'; with `val_files` it is the same (the same text, so a trained
    tokenizer is shared).
    """
    if not train_files:
        raise ValueError("data.train_files is empty; data.source=files needs at least one file")
    train_paths = resolve_files(train_files, "data.train_files")
    val_paths = resolve_files(val_files, "data.val_files") if val_files else []
    if not val_paths and not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1) when no validation split is given, got {val_fraction}")
    # With val_files the text is file_splits' and so is the key; the streamed holdout does not
    # depend on data.seed, so its key does not either (a new seed prepares nothing again).
    key_seed = seed if val_paths else 0
    key_parts = _files_key_parts(train_paths, val_paths, text_field, sample_by, val_fraction, key_seed)
    key = "files-" + _short_hash(*key_parts, *(() if val_paths else ("streamed-holdout",)))

    def stream(paths: list[str], field_name: str) -> Callable[[], Iterator[str]]:
        where = f"{field_name} ({paths[0]})" if len(paths) == 1 else (
            f"{field_name} ({len(paths)} files from {paths[0]})"
        )
        builder = FILE_BUILDERS[Path(paths[0]).suffix]
        return lambda: _stream_records(
            _file_rows(paths, sample_by), text_field, where, builder, sample_by if builder == "text" else None
        )

    streams = {"train": stream(train_paths, "data.train_files")}
    if val_paths:
        streams["validation"] = stream(val_paths, "data.val_files")
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
    they stream past (`midus.data.token_shards.held_out`), so the key is not `hub_splits`'. The
    key is made without contacting the hub (a prepared directory is found offline).
    """
    if not name:
        raise ValueError("data.hub_dataset is empty; data.source=hub needs a dataset name")
    key = "hub-" + _short_hash(name, config_name, train_split, val_split, text_field, val_fraction, "streamed")
    where = f"dataset {name!r}"

    def open_streams() -> dict[str, Callable[[], Iterator[str]]]:
        try:
            loaded = datasets.load_dataset(name, config_name or None, streaming=True)
        except Exception as error:  # datasets raises many types for "offline" / "not found"
            raise ValueError(
                f"data.hub_dataset={name!r} could not be loaded ({type(error).__name__}: {error}). If this machine "
                "is offline, prepare the shards where the hub is reachable (python -m midus prepare) and copy "
                "data.prepared_dir here, or point data.source=files and data.train_files at local files."
            ) from error
        if train_split not in loaded:
            raise ValueError(f"data.hub_train_split={train_split!r} is not a split of {name!r}; it has {list(loaded)}")
        streams = {"train": lambda: _stream_records(loaded[train_split], text_field, where, "a dataset")}
        if val_split and val_split in loaded:
            streams["validation"] = lambda: _stream_records(loaded[val_split], text_field, where, "a dataset")
        elif not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"data.val_fraction must be in (0, 1) when no validation split is given, got {val_fraction} "
                f"({name!r} has no split {val_split!r})"
            )
        return streams

    return StreamedText(key, open_streams, val_fraction)
