"""`python -m midus` shows the kit's INFO lines on stderr, once each, however often `main` runs
in one process; ``MIDUS_LOG_LEVEL`` quiets them; a program's own logging setup is respected."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from midus.cli import LOG_LEVEL_ENV, USER_ERROR_EXIT, configure_logging, main
from tests.test_cli import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
# What TextData logs once per construction (INFO, logger midus.data.text_data).
DATA_LINE = "INFO midus.data.text_data: data: biographies-s0-n20-d3, vocabulary 300,"


def tiny_validate(cache: Path, root_dir: Path) -> list[str]:
    """``validate`` of an untrained tiny quickstart model on one batch: seconds, and it logs."""
    return [
        "validate", *tiny_overrides(root_dir, cache), "--trainer.limit_val_batches", "1",
        "--trainer.logger", "false", "--trainer.default_root_dir", str(root_dir),
        "--model.probes.recall_questions", "4",
    ]


@pytest.fixture(autouse=True)
def no_level_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOG_LEVEL_ENV, raising=False)


@contextmanager
def bare_process_logging() -> Iterator[logging.Logger]:
    """The logging of a fresh ``python -m midus`` process, within a test's body: a root logger
    without handlers (pytest adds its capture handlers for each test phase; they are set aside
    and put back), and the ``midus`` logger restored afterwards, so other tests see it as before."""
    root, kit = logging.getLogger(), logging.getLogger("midus")
    saved_root, saved_kit = list(root.handlers), (list(kit.handlers), kit.propagate, kit.level)
    for handler in saved_root:
        root.removeHandler(handler)
    try:
        yield kit
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_root:
            root.addHandler(handler)
        kit.handlers[:] = saved_kit[0]
        kit.propagate, kit.level = saved_kit[1], saved_kit[2]


def test_main_shows_each_kit_info_line_once_per_run(
    tiny_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with bare_process_logging() as kit:
        for run in range(2):
            main(tiny_validate(tiny_cache, tmp_path))
            lines = capsys.readouterr().err.splitlines()
            assert sum(line.startswith(DATA_LINE) for line in lines) == 1, (run, lines)
        assert len(kit.handlers) == 1 and not kit.propagate


def test_log_level_env_quiets_info_and_keeps_warnings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    source = logging.getLogger("midus.data.sources")
    with bare_process_logging() as kit:
        monkeypatch.setenv(LOG_LEVEL_ENV, "warning")
        configure_logging()
        source.info("an info line")
        source.warning("a warning line")
        assert capsys.readouterr().err.splitlines() == ["WARNING midus.data.sources: a warning line"]
        monkeypatch.delenv(LOG_LEVEL_ENV)
        configure_logging()  # a later run in the same process: INFO again, still one handler
        source.info("an info line")
        assert capsys.readouterr().err.splitlines() == ["INFO midus.data.sources: an info line"]
        assert len(kit.handlers) == 1
        # Libraries' loggers are left alone: nothing of theirs below WARNING shows.
        logging.getLogger("datasets.some_module").info("a library's info line")
        assert capsys.readouterr().err == ""


def test_a_bad_log_level_is_one_error_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(LOG_LEVEL_ENV, "loud")
    with bare_process_logging(), pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == USER_ERROR_EXIT
    assert capsys.readouterr().err.splitlines() == [
        f"error: {LOG_LEVEL_ENV}='loud' is not a log level; use one of "
        "('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')"
    ]


def test_a_programs_own_logging_gets_the_kit_lines(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """With a root handler (a program that configured logging), the kit adds none of its own:
    its records reach the program's handlers, once."""
    with bare_process_logging() as kit:
        logging.getLogger().addHandler(caplog.handler)  # the program's handler
        configure_logging()
        logging.getLogger("midus.data.packing").info("packed")
        assert kit.handlers == [] and kit.propagate
    assert [(record.name, record.getMessage()) for record in caplog.records] == [("midus.data.packing", "packed")]
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_python_m_midus_prints_the_data_line_on_stderr(tmp_path: Path) -> None:
    environment = {key: value for key, value in os.environ.items() if key != LOG_LEVEL_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "midus", *tiny_validate(tmp_path / "cache", tmp_path)],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert sum(line.startswith(DATA_LINE) for line in lines) == 1, lines
    assert DATA_LINE not in done.stdout
