"""Bad input is one line: ``error: <field or file>: <what was expected>``, exit status 2, nothing
written, and the traceback only with ``MIDUS_DEBUG=1`` (`midus.cli.is_user_error`)."""

from __future__ import annotations

import json
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from midus.checkpoint.kit import read_kit_checkpoint
from midus.cli import DEBUG_ENV, KIT_COMMANDS, USER_ERROR_EXIT, is_user_error, main
from midus.upscale import method_names
from tests.test_checkpoint_safety import tiny_run, write_kit_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def bad_checkpoint(kind: str, folder: Path) -> Path:
    """A checkpoint path that is `kind`: missing, a folder, corrupt, truncated, a zip torch did not write, foreign."""
    path = folder / f"{kind}.ckpt"
    if kind == "folder":
        path.mkdir()
    elif kind == "corrupt":
        path.write_bytes(b"\x80\x02 not a checkpoint " * 20)
    elif kind == "truncated":
        whole = write_kit_checkpoint(folder / "whole.ckpt").read_bytes()
        path.write_bytes(whole[: len(whole) * 2 // 3])
    elif kind == "other-zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "a zip, but no data.pkl")
    elif kind == "foreign":
        torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, path)
    return path


KINDS = ["missing", "folder", "corrupt", "truncated", "other-zip", "foreign"]
EXPECTED = {"missing": "is not a file", "folder": "is not a file", "corrupt": "is not a readable checkpoint",
            "truncated": "is not a readable checkpoint", "other-zip": "is not a readable checkpoint",
            "foreign": "was not written by the kit's fit"}


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ")
    assert not any(line.startswith("Traceback") for line in lines)
    return lines[-1]


@pytest.mark.parametrize("kind", KINDS)
def test_the_kit_reader_names_the_file_of_every_bad_checkpoint(kind: str, tmp_path: Path) -> None:
    path = bad_checkpoint(kind, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as failure:
        read_kit_checkpoint(path, "--ckpt_path")
    message = str(failure.value)
    assert message.startswith(f"--ckpt_path: {str(path)!r}") and EXPECTED[kind] in message and "\n" not in message


@pytest.mark.parametrize("kind", KINDS)
def test_an_analysis_given_a_bad_checkpoint_is_one_line(kind: str, tmp_path: Path, capsys) -> None:
    path = bad_checkpoint(kind, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["memory-usage", "--ckpt_path", str(path), "--out_dir", str(tmp_path / "out")])
    assert exit_.value.code == USER_ERROR_EXIT
    error = one_error_line(capsys)
    assert str(path) in error and EXPECTED[kind] in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated", "foreign"])
def test_validate_given_a_bad_ckpt_path_is_one_line_and_writes_nothing(
    kind: str, tmp_path: Path, tiny_cache: Path, capsys
) -> None:
    path = bad_checkpoint(kind, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["validate", *tiny_run(tmp_path, tiny_cache), "--ckpt_path", str(path)])
    assert exit_.value.code == USER_ERROR_EXIT
    error = one_error_line(capsys)
    assert error.startswith(f"error: --ckpt_path: {str(path)!r}") and EXPECTED[kind] in error
    assert not (tmp_path / "runs").exists()


def test_a_bad_config_value_is_one_line_naming_the_field(tmp_path: Path, tiny_cache: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *tiny_run(tmp_path, tiny_cache), "--model.optimizer.learning_rate", "-1"])
    assert exit_.value.code == USER_ERROR_EXIT
    assert isinstance(exit_.value.__context__, ValueError)
    assert one_error_line(capsys) == "error: model.optimizer.learning_rate must be positive, got -1.0"
    assert not (tmp_path / "runs").exists()


def test_an_unregistered_upscale_method_is_one_line_listing_the_registered_ones(
    tmp_path: Path, tiny_cache: Path, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *tiny_run(tmp_path, tiny_cache), "--model.upscale.method", "solar"])
    assert exit_.value.code == USER_ERROR_EXIT
    assert one_error_line(capsys) == (
        f"error: model.upscale.method='solar' is not a registered up-scaling method; expected one of "
        f"{', '.join(method_names())}"
    )
    assert not (tmp_path / "runs").exists()


def test_with_midus_debug_the_traceback_comes_too(
    tmp_path: Path, tiny_cache: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *tiny_run(tmp_path, tiny_cache), "--model.optimizer.learning_rate", "-1"])
    assert exit_.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "Traceback" in err and "training/config.py" in err and err.strip().splitlines()[-1].startswith("error: ")
    with pytest.raises(SystemExit) as exit_:  # a kit command's error too
        main(["memory-usage", "--ckpt_path", str(bad_checkpoint("corrupt", tmp_path))])
    assert exit_.value.code == USER_ERROR_EXIT
    assert "Traceback" in capsys.readouterr().err


def test_full_unpickling_through_lightning_needs_the_opt_in(tmp_path: Path, tiny_cache: Path, capsys) -> None:
    path = write_kit_checkpoint(tmp_path / "kit.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["validate", *tiny_run(tmp_path, tiny_cache), "--ckpt_path", str(path), "--weights_only", "false"])
    assert exit_.value.code == USER_ERROR_EXIT
    assert "MIDUS_TRUST_CHECKPOINTS=1" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("", ".txt", "is empty; expected a file of training text"),
        ("  \n\n \n", ".txt", "holds no text (every record is blank)"),
        ('{"text": "a"}\n{"text": \n', ".jsonl", "could not be read as json"),
    ],
    ids=["empty", "blank", "broken-jsonl"],
)
def test_an_unusable_training_file_is_one_line_naming_it(
    content: str, suffix: str, message: str, tmp_path: Path, tiny_cache: Path, capsys
) -> None:
    text = tmp_path / f"train{suffix}"
    text.write_text(content)
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *tiny_run(tmp_path, cache), "--data.source", "files", "--data.files.train", f"[{text}]"])
    assert exit_.value.code == USER_ERROR_EXIT
    error = one_error_line(capsys)
    assert error.startswith("error: data.files.train") and str(text) in error and message in error
    assert not (tmp_path / "runs").exists()
    if content == "":
        assert not cache.exists()  # refused before datasets builds (and caches) anything


def fake_command(monkeypatch: pytest.MonkeyPatch, error: Exception) -> str:
    """A kit command whose main raises `error` from outside the kit."""
    module = types.ModuleType("fake_command")

    def command_main(args: list[str]) -> None:
        raise error

    module.main = command_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setitem(KIT_COMMANDS, "fake", ("fake_command", "raises"))
    return "fake"


@pytest.mark.parametrize("error", [TypeError("a bug"), ValueError("raised inside a library")])
def test_bugs_keep_their_traceback(error: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(type(error)):
        main([fake_command(monkeypatch, error)])


def test_which_exceptions_are_user_errors(tmp_path: Path) -> None:
    from midus.data.file_and_hub_splits import resolve_files

    def raised(call) -> BaseException:
        try:
            call()
        except Exception as error:  # noqa: BLE001 -- any is fine: the test classifies it
            return error
        raise AssertionError("no exception")

    assert is_user_error(raised(lambda: resolve_files([str(tmp_path / "nope.txt")], "data.files.train")))
    assert is_user_error(raised(lambda: open(tmp_path / "nope.txt")))  # the OS names the file
    assert not is_user_error(raised(lambda: json.loads("{")))  # a ValueError, but raised in json
    assert not is_user_error(raised(lambda: {}["key"]))
    assert not is_user_error(ValueError("never raised, so no traceback"))
