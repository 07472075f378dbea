"""Records of text: how plain-text files split into records, which rows are kept, and how long
one may be.

Plain-text files become records in one of four ways (``data.files.sample_by``): ``line`` and
``document`` are `datasets`' text builder as is; ``paragraph`` and ``article`` are split here
(`text_records`), because `datasets`' own paragraph split only knows an exactly empty line
(``"\\n\\n"``): a WikiText file, whose blank lines hold a space, was one record of the whole
file, and one tokenizer call of 22 MB took 3.5-4.1 GB. A .txt record over `MAX_RECORD_CHARS`
characters is refused (`check_record_size`), and every source keeps only the non-blank
text field (``data.files.text_field``, ``data.hub.text_field``) of its rows: `select_text` for a
loaded `Dataset`, `stream_records` for the streams that token shards are prepared from
(`midus.data.streamed_text`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import pyarrow.compute as pc
from datasets import Dataset

log = logging.getLogger(__name__)

TEXT_SAMPLE_BY = ("line", "paragraph", "article", "document")
"""``data.files.sample_by`` values: how .txt files become records."""
TEXT_RECORD_MODES = ("paragraph", "article")
"""``data.files.sample_by`` values whose .txt records `text_records` makes (the others: `datasets`)."""

MAX_RECORD_CHARS = 1_000_000
"""Longest .txt record accepted, in characters. Packing tokenizes records in batches of whole
records; the kit's BPE took about 200 bytes of memory per character of one call (a record of
22 MB of WikiText: 4.1 GB; of 1.1 MB: 270 MB), so a record of this size costs about 200 MB. A
longer record means that ``data.files.sample_by`` did not find the file's record boundaries
(``paragraph``, ``article``, ``line``: an error) or that whole files were asked for
(``document``: a warning)."""


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
        raise ValueError(f"data.files.sample_by={sample_by!r}: text_records splits {' or '.join(TEXT_RECORD_MODES)}")
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


def check_record_size(dataset: Dataset, sample_by: str, where: str) -> None:
    """Refuse (warn of, for ``document``) a .txt record over `MAX_RECORD_CHARS` characters, naming
    ``data.files.sample_by``: one tokenizer call of it would take gigabytes."""
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
            "data.files.sample_by=document: %s holds a file of %s characters (record %d, starting %r); one "
            "tokenizer call of it takes about %.1f GB (about 200 bytes a character). For less memory, "
            "split the text into records: data.files.sample_by=paragraph (blank lines), article (WikiText "
            "headings) or line", where, f"{longest:,}", index, start, longest * 200 / 1e9,
        )
        return
    hints = {
        "paragraph": "the file has no blank lines between paragraphs; use data.files.sample_by=line for a record "
                     "per line, or article for WikiText files",
        "article": "the file has no top-level WikiText heading (' = Title = ') in that stretch; use "
                   "data.files.sample_by=paragraph (blank lines) or line",
        "line": "the file has a line that long; split it into lines",
    }
    raise ValueError(
        f"data.files.sample_by={sample_by}: {where} gives a record of {longest:,} characters (record {index}, "
        f"starting {start!r}), over the {MAX_RECORD_CHARS:,} a record may hold (one tokenizer call takes about "
        f"200 bytes a character): {hints.get(sample_by, 'split the text into smaller records')}"
    )


def select_text(dataset: Dataset, text_field: str, where: str, field_name: str = "data.files.text_field") -> Dataset:
    """The non-blank `text_field` of `dataset`'s rows as one ``text`` column (`field_name` names the setting)."""
    if text_field not in dataset.column_names:
        raise ValueError(
            f"{field_name}={text_field!r} is not a column of {where}; its columns are {dataset.column_names}"
        )
    dataset = dataset.select_columns([text_field])
    if text_field != "text":
        dataset = dataset.rename_column(text_field, "text")
    return dataset.filter(lambda row: bool(row["text"] and row["text"].strip()))


def stream_records(
    rows: Iterable[dict], text_field: str, where: str, reading: str, sample_by: str | None = None,
    field_name: str = "data.files.text_field",
) -> Iterator[str]:
    """The non-blank `text_field` of each row, as `select_text` keeps them; read errors name `where`
    (and `field_name`, the setting, a missing column).

    With `sample_by` (a .txt file), a record over `MAX_RECORD_CHARS` is refused (warned of for
    ``document``) as `check_record_size` does.
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
            raise ValueError(f"{field_name}={text_field!r} is not a column of {where}; its columns are {list(row)}")
        text = row[text_field]
        if sample_by is not None and len(text) > MAX_RECORD_CHARS:
            _long_record(sample_by, where, len(text), index, text)
        index += 1
        if text and text.strip():
            kept += 1
            yield text
