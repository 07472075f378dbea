"""How plain-text files become records (``data.files.sample_by``): paragraphs split at blank lines
that may hold whitespace, WikiText articles at top-level headings, and a record too long to
tokenize in one call refused by name (issue 25)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import datasets
import pytest

from midus.cli import is_user_error
from midus.data import text_records as text_records_module
from midus.data.file_and_hub_splits import file_splits, short_hash
from midus.data.text_records import is_article_heading, text_records
from tests.conftest import SHARED_DATA

# WikiText's shape: every line starts with a space, "blank" lines hold one, headings are
# " = Title = " (articles) and " = = Section = = " (within an article).
WIKITEXT = (
    " \n"
    " = Lobster = \n"
    " \n"
    " The lobster is a crustacean . \n"
    " It lives in the sea . \n"
    " \n"
    " = = Description = = \n"
    " \n"
    " It has two claws . \n"
    " \n"
    " = = = Claws = = = \n"
    " \n"
    " One claw crushes . \n"
    " \n"
    " \n"
    " = Crab = \n"
    " \n"
    " The crab walks sideways . \n"
    " \n"
)
LOBSTER = (
    " = Lobster = \n \n The lobster is a crustacean . \n It lives in the sea . \n \n = = Description = = \n \n"
    " It has two claws . \n \n = = = Claws = = = \n \n One claw crushes . "
)
CRAB = " = Crab = \n \n The crab walks sideways . "


def records(tmp_path: Path, text: str, sample_by: str, name: str = "text.txt") -> list[str]:
    """Training records of `text` through the files source (validation from the same file)."""
    path = tmp_path / name
    path.write_text(text)
    splits, _ = file_splits([str(path)], [str(path)], 0.05, "text", sample_by, str(tmp_path / "cache"), 0)
    return list(splits["train"]["text"])


def test_articles_start_at_top_level_headings(tmp_path: Path) -> None:
    assert records(tmp_path, WIKITEXT, "article") == [LOBSTER, CRAB]


def test_text_before_the_first_heading_is_a_record_and_a_file_without_one_is_one_record(tmp_path: Path) -> None:
    assert records(tmp_path, "A preface .\n\n = Crab = \n walks\n", "article") == ["A preface .", " = Crab = \n walks"]
    assert records(tmp_path, "one\n\ntwo\n", "article", "plain.txt") == ["one\n\ntwo"]


@pytest.mark.parametrize(
    ("line", "heading"),
    [
        (" = Lobster = ", True),
        ("= Lobster =", True),
        (" = Lobster = Homarus = ", True),
        (" = = Description = = ", False),
        (" = = = Claws = = = ", False),
        (" = = = = Deeper = = = = ", False),
        (" x = 1 = ", False),
        (" = ", False),
        ("", False),
    ],
)
def test_article_heading_is_lm_eval_wikitexts_test(line: str, heading: bool) -> None:
    assert is_article_heading(line) is heading


def test_whitespace_only_lines_separate_paragraphs(tmp_path: Path) -> None:
    text = "first line\nstill first\n \t \nsecond\n\n\n   \nthird\n"
    assert records(tmp_path, text, "paragraph") == ["first line\nstill first", "second", "third"]
    # WikiText: headings and paragraphs are records of their own, lines as in the file.
    assert records(tmp_path, WIKITEXT, "paragraph", "wiki.txt") == [
        " = Lobster = ", " The lobster is a crustacean . \n It lives in the sea . ", " = = Description = = ",
        " It has two claws . ", " = = = Claws = = = ", " One claw crushes . ", " = Crab = ",
        " The crab walks sideways . ",
    ]


def test_paragraphs_of_a_file_with_empty_blank_lines_are_datasets_paragraphs(tmp_path: Path) -> None:
    """Where `datasets`' own split works (blank lines empty, never three newlines in a row), the
    records are its records, less the newline that ends the file."""
    text = "The quick brown fox.\nJumps.\n\nA second paragraph.\n\nThe last one.\n"
    path = tmp_path / "clean.txt"
    path.write_text(text)
    theirs = datasets.load_dataset(
        "text", data_files=[str(path)], split="train", sample_by="paragraph", cache_dir=str(tmp_path / "hf")
    )["text"]
    assert list(text_records(str(path), "paragraph")) == [*theirs[:-1], theirs[-1].removesuffix("\n")]


def test_records_follow_a_changed_file(tmp_path: Path) -> None:
    assert records(tmp_path, "one\n\ntwo\n", "paragraph") == ["one", "two"]
    assert records(tmp_path, "one\n\ntwo\n\nthree and more\n", "paragraph") == ["one", "two", "three and more"]


def test_cache_keys_change_for_txt_paragraphs_only(tmp_path: Path) -> None:
    """Paragraph records of .txt files changed, so their cache key did; every other key is the
    one earlier versions computed (their cached tokenizers and blocks stay valid)."""
    text, jsonl = tmp_path / "a.txt", tmp_path / "a.jsonl"
    text.write_text("one\n\ntwo\n")
    jsonl.write_text('{"text": "one"}\n{"text": "two"}\n')
    cache = str(tmp_path / "cache")

    def key(path: Path, sample_by: str) -> tuple[str, str]:
        stats = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)] * 2  # training, validation
        earlier = "files-" + short_hash(stats, "text", sample_by, 0.05, 0)
        return file_splits([str(path)], [str(path)], 0.05, "text", sample_by, cache, 0)[1], earlier

    for path, sample_by in ((jsonl, "paragraph"), (text, "line"), (text, "document")):
        now, earlier = key(path, sample_by)
        assert now == earlier
    now, earlier = key(text, "paragraph")
    assert now != earlier


def test_a_record_over_the_limit_names_text_sample_by(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_records_module, "MAX_RECORD_CHARS", 100)
    one_long_paragraph = "".join(f" line {index} without a blank line after it\n" for index in range(10))
    for sample_by, hint in (("paragraph", "no blank lines between paragraphs"), ("article", "no top-level WikiText")):
        with pytest.raises(ValueError) as raised:
            records(tmp_path, one_long_paragraph, sample_by)
        message = str(raised.value)
        assert message.startswith(f"data.files.sample_by={sample_by}: data.files.train (")
        length = len(one_long_paragraph) - 1  # the record is the file less its final newline
        assert f"a record of {length} characters (record 0, starting 'line 0 without" in message
        assert "over the 100 a record may hold" in message and hint in message
        assert is_user_error(raised.value)  # `python -m midus` prints it as one error line
    # Short records pass, a WikiText article just under the limit included.
    assert len(records(tmp_path, one_long_paragraph, "line")) == 10
    monkeypatch.setattr(text_records_module, "MAX_RECORD_CHARS", len(LOBSTER))
    assert records(tmp_path, WIKITEXT, "article") == [LOBSTER, CRAB]


def test_a_whole_file_over_the_limit_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(text_records_module, "MAX_RECORD_CHARS", 100)
    with caplog.at_level(logging.WARNING, logger="midus.data.text_records"):
        assert records(tmp_path, WIKITEXT, "document") == [WIKITEXT]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2  # training and validation files
    assert warnings[0].startswith(f"data.files.sample_by=document: data.files.train ({tmp_path / 'text.txt'}) holds")
    assert f"a file of {len(WIKITEXT)} characters" in warnings[0] and "data.files.sample_by=paragraph" in warnings[0]


def test_blank_or_undecodable_text_is_refused_by_field(tmp_path: Path) -> None:
    for sample_by in ("paragraph", "article"):
        with pytest.raises(ValueError, match=r"data.files.train \(.*\): holds no text \(every record is blank\)"):
            records(tmp_path, " \n\n \t\n", sample_by)
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9\n\nbar\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"data.files.train \(.*latin1.txt\): could not be read as text "
                                         r"\(UnicodeDecodeError"):
        file_splits([str(path)], [], 0.5, "text", "paragraph", str(tmp_path / "cache"), 0)


@pytest.mark.skipif(not (SHARED_DATA / "wikitext2-valid.txt").is_file(), reason="../shared/data is absent")
def test_wikitext2_validation_is_one_record_per_article(tmp_path: Path) -> None:
    path = SHARED_DATA / "wikitext2-valid.txt"
    text = path.read_text(encoding="utf-8")
    headings = re.findall(r"^ = [^=].* = $", text, flags=re.MULTILINE)  # " = Title = ", not " = = Section = = "
    splits, _ = file_splits([str(path)], [str(path)], 0.05, "text", "article", str(tmp_path / "cache"), 0)
    articles = splits["train"]["text"]
    assert len(headings) == 60 and len(articles) == len(headings)
    assert [article.split("\n")[0] for article in articles] == headings
    # Nothing is lost: the articles in order are the file, less the blank lines around them.
    assert re.sub(r"\s", "", "".join(articles)) == re.sub(r"\s", "", text)
    assert max(len(article) for article in articles) < text_records_module.MAX_RECORD_CHARS
    # Paragraph records are WikiText's paragraphs, not the whole file (as `datasets` made it).
    paragraphs, _ = file_splits([str(path)], [str(path)], 0.05, "text", "paragraph", str(tmp_path / "cache"), 0)
    assert len(paragraphs["train"]) > 1000 and max(len(p) for p in paragraphs["train"]["text"]) < 10_000
