"""Checkpoints are data, not code: every reader of a checkpoint refuses one whose unpickling
would run code, with one error naming the file, and nothing runs (`midus.checkpoint.safe_load`).

The payload is one extra entry of an otherwise valid kit checkpoint; unpickling it would create
a marker file. Each test reads the file through one of the kit's readers and checks the marker
is still absent. ``MIDUS_TRUST_CHECKPOINTS=1`` is the opt-in for trusted legacy files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from midus.checkpoint.kit import kit_entries, load_kit_checkpoint, read_kit_checkpoint
from midus.checkpoint.safe_load import TRUST_ENV, CheckpointError
from midus.cli import main
from midus.model import MidusLM, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval_task"
TASK = "midus_letter_successor"


class RunsCode:
    """An object whose unpickling calls `exec`, which creates `marker` (or, with `shell`, runs
    ``touch marker`` through `os.system`)."""

    def __init__(self, marker: Path, shell: bool = False) -> None:
        self.marker, self.shell = str(marker), shell

    def __reduce__(self):  # noqa: ANN204 -- pickle's protocol
        if self.shell:
            return os.system, (f"touch '{self.marker}'",)
        return exec, (f"open({self.marker!r}, 'w').close()",)


def write_kit_checkpoint(path: Path, extra: object = None) -> Path:
    """A small but complete kit checkpoint (weights, model config, tokenizer), plus `extra`."""
    from midus.data.tokenizers import train_char

    config = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2)
    model = MidusLM(config)
    checkpoint = {
        "state_dict": {f"model.{name}": value for name, value in model.state_dict().items()},
        "hyper_parameters": {"config": dataclasses.asdict(config)},
        "global_step": 3,
        **kit_entries(config, train_char([["abcdef ghij"]])),
    }
    if extra is not None:
        checkpoint["extra"] = extra
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload_ran"


@pytest.fixture
def unsafe(tmp_path: Path, marker: Path) -> Path:
    return write_kit_checkpoint(tmp_path / "unsafe.ckpt", RunsCode(marker))


def assert_refused(message: str, path: Path, marker: Path) -> None:
    assert str(path) in message and "arbitrary unpickling" in message and TRUST_ENV in message
    assert "builtins.exec" in message
    assert not marker.exists(), "the checkpoint's payload ran"


def test_the_payload_is_real_and_runs_under_a_full_unpickle(unsafe: Path, marker: Path) -> None:
    torch.load(unsafe, map_location="cpu", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("shell", [False, True], ids=["exec", "os.system"])
def test_the_kit_reader_refuses_code_and_reads_the_same_file_without_it(
    tmp_path: Path, marker: Path, shell: bool
) -> None:
    path = write_kit_checkpoint(tmp_path / "unsafe.ckpt", RunsCode(marker, shell))
    with pytest.raises(CheckpointError) as refused:
        read_kit_checkpoint(path, "--ckpt_path")
    message = str(refused.value)
    assert message.startswith(f"--ckpt_path: {str(path)!r}") and "\n" not in message
    assert ("posix.system" if shell else "builtins.exec") in message and not marker.exists()
    clean = write_kit_checkpoint(tmp_path / "clean.ckpt")
    assert read_kit_checkpoint(clean)["global_step"] == 3


def test_trusted_legacy_files_load_with_the_opt_in(
    tmp_path: Path, unsafe: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = write_kit_checkpoint(tmp_path / "legacy.ckpt", argparse.Namespace(lr=0.1))  # not plain data
    with pytest.raises(CheckpointError, match=r"legacy.ckpt'.*\(argparse.Namespace\)"):
        read_kit_checkpoint(legacy)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert read_kit_checkpoint(legacy)["extra"] == argparse.Namespace(lr=0.1)
    read_kit_checkpoint(unsafe)  # trusted means trusted: the opt-in unpickles everything
    assert marker.exists()


@pytest.mark.slow
def test_a_plain_trainer_checkpoint_reads_without_its_classes_imported(tmp_path: Path) -> None:
    """Hyperparameters of a checkpoint written outside the CLI hold kit dataclasses; a process
    that never imported their layer reads them as dicts of their fields (nothing is imported)."""
    import subprocess
    import sys

    from midus.upscale import UpscaleConfig

    path = write_kit_checkpoint(tmp_path / "trainer.ckpt", {"upscale": UpscaleConfig(every=2)})
    assert read_kit_checkpoint(path)["extra"]["upscale"] == UpscaleConfig(every=2)
    script = (
        "import sys\nfrom midus.checkpoint.kit import read_kit_checkpoint\n"
        f"extra = read_kit_checkpoint({str(path)!r})['extra']\n"
        "print(extra['upscale']['every'], 'midus.upscale' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr[-2000:]


def test_base_model_tokenizer_and_export_readers_refuse_it(unsafe: Path, marker: Path, tmp_path: Path) -> None:
    from midus.checkpoint import export_hf_checkpoint, load_base
    from midus.data.tokenizers import load_tokenizer_dir

    with pytest.raises(CheckpointError) as refused:
        load_base(str(unsafe))  # model.upscale.base_checkpoint
    assert_refused(str(refused.value), unsafe, marker)
    with pytest.raises(CheckpointError) as refused:
        load_tokenizer_dir(unsafe, "data.tokenizer_path")
    assert str(refused.value).startswith("data.tokenizer_path:")
    assert_refused(str(refused.value), unsafe, marker)
    with pytest.raises(CheckpointError) as refused:  # the export reads its model with load_kit_checkpoint
        export_hf_checkpoint(load_kit_checkpoint(unsafe), tmp_path / "hf")
    assert_refused(str(refused.value), unsafe, marker)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("command", ["memory-usage", "head-importance", "fixed-retrieval"])
def test_every_analysis_refuses_it(
    command: str, unsafe: Path, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--ckpt_path", str(unsafe), "--out_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --ckpt_path:") and len(error.splitlines()) == 1
    assert_refused(error, unsafe, marker)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(find_spec("lm_eval") is None, reason='needs pip install "midus[eval]"')
def test_lm_eval_refuses_it(
    unsafe: Path, marker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager  # the harness's own ~15,000 task files take ~15 s to index
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: real(**{**kwargs, "include_defaults": False}))
    monkeypatch.chdir(ROOT)
    output = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_:
        main(["lm-eval", "--ckpt_path", str(unsafe), "--include_path", str(TASK_DIR), "--tasks", TASK,
              "--output_path", str(output)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1
    assert_refused(error, unsafe, marker)
    assert not output.exists()


def tiny_run(tmp_path: Path, cache: Path) -> list[str]:
    return [
        "--config", str(ROOT / "experiments" / "quickstart.yaml"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--model.config.d_model", "16", "--model.config.n_layers", "1", "--model.probes.recall_questions", "0",
        "--data.embedded.num_people", "20", "--data.embedded.docs_per_person", "3",
        "--data.bpe_vocab_size", "300", "--data.block_size", "32", "--data.cache_dir", str(cache),
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "--ckpt_path", "{ckpt}"],
        ["validate", "--ckpt_path", "{ckpt}"],
        ["fit", "--model.upscale.method", "midus", "--model.upscale.base_checkpoint", "{ckpt}"],
        ["fit", "--data.tokenizer", "hf", "--data.tokenizer_path", "{ckpt}"],
    ],
    ids=["fit-resume", "validate", "upscale-base", "tokenizer-path"],
)
def test_the_lightning_cli_refuses_it_before_writing_anything(
    args: list[str], unsafe: Path, marker: Path, tmp_path: Path, tiny_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([args[0], *tiny_run(tmp_path, tiny_cache), *(arg.format(ckpt=unsafe) for arg in args[1:])])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ")
    assert_refused(error, unsafe, marker)
    assert not (tmp_path / "runs").exists()
