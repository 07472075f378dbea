"""Rerunning an ablation continues it: finished arms are skipped, an interrupted arm resumes from its
newest checkpoint, a run of another configuration is refused, and ``--fresh`` starts arms again."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import pytest
import torch
import yaml

from midus.ablation import command_line, runner
from midus.ablation.resume import newest_checkpoint
from midus.ablation.runner import AblationError, run_ablation
from midus.cli import main
from midus.training.divergence import EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
Fit = Callable[[Path], int]
"""A fake arm process: gets the arm's run directory, returns its exit status."""


def tiny_base() -> dict:
    """The quickstart shrunk to seconds (as tests/test_ablation_failure.py's), as a YAML base."""
    base = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    base["trainer"].update(val_check_interval=3, log_every_n_steps=2)
    base["model"]["config"].update(d_model=32, n_layers=2)
    base["model"]["probes"] = {"recall_questions": 0}
    base["data"]["embedded"].update(num_people=30, docs_per_person=4)
    base["data"].update(bpe_vocab_size=300, block_size=32, batch_size=8)
    return base


def write_ablation(tmp_path: Path, arms: dict, base: dict | None = None) -> Path:
    path = tmp_path / "ablate_tiny.yaml"
    document = {"ablation": {"name": "tiny", "arms": arms}, **(base or tiny_base())}
    path.write_text(yaml.safe_dump(document, sort_keys=False))  # arms run in YAML order
    return path


def command(path: Path, tmp_path: Path, cache: Path, *extra: str, steps: int = 6) -> list[str]:
    return [
        "fit", "--config", str(path), *extra,
        "--trainer.max_steps", str(steps),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.cache_dir", str(cache),
    ]


def save_checkpoint(path: Path, step: int, mtime: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "epoch": 0, "state_dict": {"w": torch.zeros(2)}}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def finish(run_dir: Path) -> int:
    """What a fit that ran to its end leaves: a summary naming its config."""
    record = {"config_paths": [str(run_dir / "arm_config.yaml")], "params": {"total": 1000}, "train": {"steps": 6}}
    (run_dir / "summary.json").write_text(json.dumps(record))
    return 0


def interrupted_at(step: int, exit_code: int) -> Fit:
    """A fit killed (or diverged) after its checkpoint at `step`."""
    return lambda run_dir: save_checkpoint(run_dir / "checkpoints" / "last.ckpt", step) or exit_code


def fake_runs(monkeypatch, fits: dict[str, Fit]) -> list[list[str]]:
    """Replace the arms' processes by `fits` (default: `finish`); returns the arm commands run."""
    calls: list[list[str]] = []

    def run(arm_command: list[str]) -> int:
        calls.append(arm_command)
        run_dir = Path(arm_command[arm_command.index("--config") + 1]).parent
        return fits.get(run_dir.name, finish)(run_dir)

    monkeypatch.setattr("midus.ablation.runner.run_arm_process", run)
    return calls


def arms_of(calls: list[list[str]]) -> list[str]:
    return [Path(call[call.index("--config") + 1]).parent.name for call in calls]


def statuses(experiment: Path) -> dict[str, str]:
    return {row["arm"]: row["status"] for row in csv.DictReader((experiment / "summary.csv").open())}


def test_the_newest_checkpoint_is_the_highest_step_and_the_last_written_among_equals(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / "best-step=2.ckpt", 2, mtime=3_000)  # written last, but an earlier step
    save_checkpoint(folder / "last.ckpt", 5, mtime=1_000)  # no step in its name
    save_checkpoint(folder / "step-step=5.ckpt", 5, mtime=2_000)  # same step, written after last.ckpt
    save_checkpoint(folder / "step-step=4.ckpt", 4, mtime=2_500)
    (folder / "torn.ckpt").write_bytes(b"PK\x03\x04 cut short by a kill")
    newest, unreadable = newest_checkpoint(sorted(folder.glob("*.ckpt")))
    assert newest is not None and (newest.path.name, newest.step) == ("step-step=5.ckpt", 5)
    [problem] = unreadable
    assert problem.startswith("torn.ckpt: ")
    assert newest_checkpoint([folder / "torn.ckpt"]) == (None, unreadable)


def test_a_rerun_skips_finished_arms_and_resumes_an_interrupted_one(
    tmp_path: Path, tiny_cache: Path, monkeypatch, capsys
) -> None:
    path = write_ablation(tmp_path, {"a": {}, "b": {"model.optimizer.learning_rate": 0.01}, "c": {}})
    args = command(path, tmp_path, tiny_cache)
    experiment = tmp_path / "runs" / "tiny"
    calls = fake_runs(monkeypatch, {"b": interrupted_at(3, -signal.SIGKILL)})
    assert run_ablation(args) == 1
    assert arms_of(calls) == ["a", "b", "c"]  # the runner went on after b was killed
    assert statuses(experiment) == {"a": "ok", "b": "failed (exit -9)", "c": "ok"}
    first_b = calls[1]
    recorded = yaml.safe_load((experiment / "b" / "arm_command.yaml").read_text())["args"]
    assert recorded == first_b and "--ckpt_path" not in first_b
    # More checkpoints of the same run: the newest by step is resumed, an unreadable one is reported.
    save_checkpoint(experiment / "b" / "checkpoints" / "step-step=5.ckpt", 5, mtime=1_000)
    (experiment / "b" / "checkpoints" / "torn.ckpt").write_bytes(b"")
    capsys.readouterr()

    calls = fake_runs(monkeypatch, {})  # this time b runs to its end
    assert run_ablation(args) == 0
    newest = experiment / "b" / "checkpoints" / "step-step=5.ckpt"
    assert calls == [[*first_b, "--ckpt_path", str(newest)]]  # the same command, plus where to resume
    out, err = capsys.readouterr()
    assert f"arm a (1/3) -> {experiment / 'a'}: finished earlier (summary.json), skipped" in out
    assert f"arm b (2/3) -> {experiment / 'b'}: resumed from {newest} (step 5)" in out
    assert "arm c (3/3)" in out and "not resuming from unreadable torn.ckpt" in err
    assert statuses(experiment) == {"a": "ok", "b": "ok", "c": "ok"}

    calls.clear()
    assert run_ablation(args) == 0 and calls == []  # everything finished: nothing runs


def test_a_diverged_arm_is_reported_failed_the_next_runs_and_a_rerun_resumes_it(
    tmp_path: Path, tiny_cache: Path, monkeypatch, capfd
) -> None:
    path = write_ablation(tmp_path, {"hot": {"model.optimizer.learning_rate": 10.0}, "cool": {}})
    args = command(path, tmp_path, tiny_cache)
    calls = fake_runs(monkeypatch, {"hot": interrupted_at(3, EXIT_CODE)})
    with pytest.raises(SystemExit) as failure:  # on the command line: exit 1 after the table
        main(args)
    assert failure.value.code == 1 and arms_of(calls) == ["hot", "cool"]
    out, err = capfd.readouterr()
    assert f"=== arm hot failed with exit code {EXIT_CODE}; rerunning this command resumes it" in err
    assert "| hot | failed (exit 3) |" in out and "| cool | ok |" in out

    calls.clear()
    assert run_ablation(args) == 1  # the same command: hot resumes (and, unchanged, diverges again)
    [call] = calls
    assert call[-2:] == ["--ckpt_path", str(tmp_path / "runs" / "tiny" / "hot" / "checkpoints" / "last.ckpt")]


def test_a_run_of_another_configuration_is_refused_naming_the_arm(
    tmp_path: Path, tiny_cache: Path, monkeypatch
) -> None:
    path = write_ablation(tmp_path, {"a": {}, "b": {"model.optimizer.learning_rate": 0.01}})
    experiment = tmp_path / "runs" / "tiny"
    calls = fake_runs(monkeypatch, {"b": interrupted_at(3, 1)})
    run_ablation(command(path, tmp_path, tiny_cache))
    before = sorted(p.relative_to(experiment) for p in experiment.rglob("*"))
    calls.clear()

    write_ablation(tmp_path, {"a": {}, "b": {"model.optimizer.learning_rate": 0.02}})  # b's override edited
    with pytest.raises(AblationError) as refused:
        run_ablation(command(path, tmp_path, tiny_cache))
    message = str(refused.value)
    assert f"arm 'b': {experiment / 'b'} holds a run (1 checkpoint(s)) started with a different config" in message
    assert "model.optimizer.learning_rate: 0.01 -> 0.02" in message and "Pass --fresh" in message
    assert "arm 'a'" not in message and message.endswith("(--arm b --fresh restarts only that arm)")

    write_ablation(tmp_path, {"a": {}, "b": {"model.optimizer.learning_rate": 0.01}})  # back as it was; other args
    with pytest.raises(SystemExit) as failure:
        main(command(path, tmp_path, tiny_cache, steps=7))
    assert failure.value.code == 2
    changed = "(?s)arm 'a'.*summary.json.*max_steps 6.*, now .*max_steps 7.*arm 'b'"
    assert re.search(changed, str(failure.value.__cause__))

    (experiment / "b" / "arm_command.yaml").unlink()  # e.g. a run started before the runner kept it
    with pytest.raises(AblationError, match="arm 'b': .*without a readable record of how"):
        run_ablation(command(path, tmp_path, tiny_cache, "--arm", "b"))
    assert calls == []  # nothing ran, and nothing else was touched
    before.remove(Path("b") / "arm_command.yaml")
    assert sorted(p.relative_to(experiment) for p in experiment.rglob("*")) == before


def test_fresh_deletes_what_the_fit_wrote_and_starts_from_step_0(
    tmp_path: Path, tiny_cache: Path, monkeypatch, capsys
) -> None:
    path = write_ablation(tmp_path, {"a": {}, "b": {}})
    experiment = tmp_path / "runs" / "tiny"
    calls = fake_runs(monkeypatch, {"a": interrupted_at(3, 1)})
    run_ablation(command(path, tmp_path, tiny_cache))
    run_dir = experiment / "a"
    fit_files = [run_dir / name for name in ("config.yaml", "hparams.yaml", "events.out.tfevents.1.host")]
    for file in fit_files:
        file.write_text("from the earlier run")
    (run_dir / "summary.json").write_text("{}")  # a summary some other program wrote
    (run_dir / "analysis").mkdir()
    (run_dir / "notes.txt").write_text("mine")
    write_ablation(tmp_path, {"a": {"model.optimizer.learning_rate": 0.02}, "b": {}})  # --fresh also takes a new config
    seen: list[list[str]] = []

    def fresh_fit(directory: Path) -> int:
        seen.append(sorted(p.name for p in directory.iterdir()))  # what the fit starts with
        return finish(directory)

    calls = fake_runs(monkeypatch, {"a": fresh_fit})
    capsys.readouterr()
    assert run_ablation(command(path, tmp_path, tiny_cache, "--fresh", "--arm", "a")) == 0
    [call] = calls
    assert "--fresh" not in call and "--ckpt_path" not in call and "--arm" not in call
    assert seen == [["analysis", "arm_command.yaml", "arm_config.yaml", "notes.txt"]]  # checkpoints/ too is gone
    assert yaml.safe_load((run_dir / "arm_config.yaml").read_text())["model"]["optimizer"]["learning_rate"] == 0.02
    assert yaml.safe_load((run_dir / "arm_command.yaml").read_text())["args"] == call
    out = capsys.readouterr().out
    assert "arm a (1/1) -> " in out and "fresh start (removed 5 file(s) of the earlier run (--fresh); kept " in out
    assert "kept analysis, notes.txt)" in out

    with pytest.raises(AblationError, match="--fresh takes no value"):
        run_ablation(command(path, tmp_path, tiny_cache, "--fresh=true"))
    with pytest.raises(AblationError, match="--fresh starts arms afresh of an ablation YAML"):
        command_line.parse_command_line(["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"), "--fresh"])
    with pytest.raises(AblationError, match="chooses each arm's --ckpt_path"):
        run_ablation(command(path, tmp_path, tiny_cache, "--ckpt_path", str(run_dir / "x.ckpt")))


class KillAfterStep(pl.Callback):
    """A preemption for the end-to-end test: SIGKILL its own process in the first training batch after
    `step` (its checkpoint is written) if `marker` exists, deleting the marker so the rerun goes on."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step > self.step and self.marker.exists():
            self.marker.unlink()
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_arm_resumes_from_its_checkpoint_when_the_same_command_reruns(
    tmp_path: Path, tiny_cache: Path, tiny_data, monkeypatch, capfd
) -> None:
    # tiny_data: its corpus and BPE are this base's, so the arms find the tokenizer cached.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The arms' processes import this module for KillAfterStep.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    marker = tmp_path / "kill-me"
    marker.touch()
    base = tiny_base()
    kill = {"class_path": f"{__name__}.KillAfterStep", "init_args": {"step": 3, "marker": str(marker)}}
    callbacks = [*base["trainer"]["callbacks"], kill]
    # One arm, to keep to two real fits; the unit tests above run several arms around a failed one.
    path = write_ablation(tmp_path, {"killed": {"trainer.callbacks": callbacks}})
    args = command(path, tmp_path, tiny_cache)
    run_dir = tmp_path / "runs" / "tiny" / "killed"

    with pytest.raises(SystemExit) as failure:
        main(args)
    assert failure.value.code == 1 and not marker.exists()
    assert "=== arm killed failed with exit code -9" in capfd.readouterr().err
    assert statuses(run_dir.parent) == {"killed": "failed (exit -9)"}
    assert not (run_dir / "summary.json").exists() and list((run_dir / "checkpoints").glob("*.ckpt"))

    calls: list[list[str]] = []
    real_run = runner.run_arm_process  # the real processes, recorded
    monkeypatch.setattr(runner, "run_arm_process", lambda arm: calls.append(arm) or real_run(arm))
    assert run_ablation(args) == 0  # the same command again
    [call] = calls
    assert call[-2] == "--ckpt_path" and Path(call[-1]).parent == run_dir / "checkpoints"
    step = torch.load(call[-1], map_location="cpu", weights_only=True)["global_step"]
    out, err = capfd.readouterr()
    assert f"resumed from {call[-1]} (step {step})" in out
    assert f"Restored all states from the checkpoint at {call[-1]}" in out + err  # Lightning's word for it
    summary = (run_dir / "summary.json").read_text()
    assert step == 3 and json.loads(summary)["train"]["steps"] == 6
    assert statuses(run_dir.parent) == {"killed": "ok"}

    calls.clear()
    assert run_ablation(args) == 0 and calls == []  # and once more: finished, so skipped
    assert "killed: finished earlier (summary.json), skipped" in capfd.readouterr().out
    assert (run_dir / "summary.json").read_text() == summary
