"""Equal tuning budgets (``ablation.tune``, ``--tune``) and runs several at a time (``--jobs``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from test_ablation import command, fake_finished_runs, write_ablation

from midus.ablation.command_line import parse_command_line
from midus.ablation.config import AblationError, load_ablation
from midus.ablation.runner import LOG_FILE, Launch, child_environment, run_ablation, run_launches
from midus.ablation.tuning import choose, tuning_markdown
from midus.report.table import ArmRow

TUNE = {
    "seed": 5,
    "metric": "val.loss",
    "overrides": {"data.embedded.seed": 2},
    "candidates": {"slow": {"model.optimizer.learning_rate": 0.001}, "fast": {"model.optimizer.learning_rate": 0.01}},
}


def tuned_ablation(tmp_path: Path, tune: dict = TUNE, **section) -> Path:
    arms = {"ref": {}, "deep": {"model.config.n_layers": 3, "model.optimizer.learning_rate": 0.01}}
    path = write_ablation(tmp_path, name="tiny", arms=arms)
    document = yaml.safe_load(path.read_text())
    document["ablation"].update(tune=tune, seeds=[0, 1], reference="ref", **section)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def fake_tuning_runs(monkeypatch, loss: dict[tuple[int, float], float]) -> list[dict]:
    """Arm processes that record their config and write val.loss = loss[(n_layers, learning_rate)]."""
    configs: list[dict] = []

    def val_of(arm_config: Path, config: dict) -> dict:
        configs.append(config | {"run": arm_config.parent.name})
        return {"loss": loss[config["model"]["config"]["n_layers"], config["model"]["optimizer"]["learning_rate"]]}

    fake_finished_runs(monkeypatch, val_of)
    return configs


def test_every_arm_runs_every_candidate_on_the_tuning_data_and_the_choice_is_tabulated(
    tmp_path: Path, tiny_cache: Path, monkeypatch
) -> None:
    # The base (2 layers) is best slow, the 3-layer arm best fast: each arm gets its own choice.
    configs = fake_tuning_runs(monkeypatch, {(2, 0.001): 3.1, (2, 0.01): 3.4, (3, 0.001): 3.3, (3, 0.01): 3.0})
    path = tuned_ablation(tmp_path)
    assert run_ablation(command(path, tmp_path, tiny_cache, "--tune")) == 0
    # Equal budget: both arms, both candidates, one run each, the tuning seed (not ablation.seeds),
    # on the tuning data (the overrides), with the candidate applied after the arm's own setting.
    assert [c["run"] for c in configs] == ["ref.slow", "ref.fast", "deep.slow", "deep.fast"]
    assert {c["seed_everything"] for c in configs} == {5}
    assert {c["data"]["embedded"]["seed"] for c in configs} == {2}
    assert [c["model"]["optimizer"]["learning_rate"] for c in configs] == [0.001, 0.01, 0.001, 0.01]
    experiment = tmp_path / "runs" / "tiny_tune"
    table = (experiment / "tuning.md").read_text()
    assert "| ref | 3.1000 | 3.4000 | slow | set model.optimizer.learning_rate: 0.001 |" in table  # the base has 0.003
    assert "| deep | 3.3000 | 3.0000 | fast | uses it |" in table
    assert "seed 5" in table and "`data.embedded.seed: 2`" in table and "lowest `val.loss`" in table
    assert not (tmp_path / "runs" / "tiny").exists()  # the reported runs are not touched
    # A rerun skips the finished tuning runs; --arm tunes only the arms it names.
    configs.clear()
    assert run_ablation(command(path, tmp_path, tiny_cache, "--tune", "--arm", "deep")) == 0
    assert configs == []
    assert "| deep | 3.3000 | 3.0000 | fast | uses it |" in (experiment / "tuning.md").read_text()


def test_a_failed_candidate_loses_and_a_missing_one_leaves_the_arm_unchosen(
    tmp_path: Path, tiny_cache: Path, monkeypatch
) -> None:
    # ref's slow run diverges (no finite loss): it counts as failed and fast wins.
    fake_tuning_runs(monkeypatch, {(2, 0.001): float("nan"), (2, 0.01): 3.4, (3, 0.001): 3.3, (3, 0.01): 3.0})
    path = tuned_ablation(tmp_path)
    run_ablation(command(path, tmp_path, tiny_cache, "--tune"))
    experiment = tmp_path / "runs" / "tiny_tune"
    tuning = (experiment / "tuning.md").read_text()
    assert "| ref | failed | 3.4000 | fast | set model.optimizer.learning_rate: 0.01 |" in tuning
    # A candidate whose run crashes without a summary loses too; one not run yet leaves no choice.
    for leftover in (experiment / "deep.fast").iterdir():
        leftover.unlink()
    monkeypatch.setattr("midus.ablation.runner.run_arm_process", lambda arm_command: 1)
    assert run_ablation(command(path, tmp_path, tiny_cache, "--tune", "--arm", "deep")) == 1
    assert "| deep | 3.3000 | failed | slow | set model.optimizer.learning_rate: 0.001 |" in (
        experiment / "tuning.md"
    ).read_text()
    ablation = load_ablation(path)
    rows = [ArmRow("deep.slow", "ok", {"val": {"loss": 3.3}}), ArmRow("deep.fast", "not run", None)]
    [choice] = choose(ablation.tune, ["deep"], rows)
    assert choice.scores == {"slow": 3.3, "fast": None} and choice.chosen is None
    assert "| deep | 3.3000 |  | (not every candidate ran) |" in tuning_markdown(ablation, [choice])


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"candidates": {"only": {"model.optimizer.learning_rate": 0.1}}}, r"candidates: expected at least two"),
        ({"candidates": {"a": {}, "b": {"x": 1}}}, r"candidates.a: expected a non-empty mapping"),
        ({"candidates": {"a b": {"x": 1}, "c": {"x": 2}}}, r"name 'a b' must be a directory name"),
        ({**TUNE, "seed": -1}, r"ablation.tune.seed: expected a non-negative integer"),
        ({**TUNE, "grid": {}}, r"ablation.tune: expected a mapping with 'candidates'"),
        ({**TUNE, "keep": {"deep": "model.optimizer.learning_rate"}}, r"ablation.tune.keep: expected arm -> a list"),
        ({"candidates": {"cos": {"model.optimizer.learning_rate": 0.1},
                         "const": {"model.optimizer.learning_rate": 0.1, "model.schedule.min_lr_ratio": 1.0}}},
         r"every candidate must set the same keys; cos sets model.optimizer.learning_rate and const sets "
         r"model.optimizer.learning_rate, model.schedule.min_lr_ratio"),
        ({**TUNE, "keep": {"deep": ["model.memory_optimizer.learning_rate"]}},
         r"tune.keep.deep: model.memory_optimizer.learning_rate is not set by an arm"),
        ({**TUNE, "keep": {"wide": ["model.optimizer.learning_rate"]}}, r"tune.keep.wide: .* the arms are: ref, deep"),
    ],
)
def test_bad_tune_sections_name_the_field(tmp_path: Path, tune: dict, message: str) -> None:
    with pytest.raises(AblationError, match=message):
        load_ablation(tuned_ablation(tmp_path, tune))


def test_tune_without_a_tune_section_is_refused(tmp_path: Path, tiny_cache: Path) -> None:
    path = write_ablation(tmp_path, name="tiny", arms={"a": {}})
    with pytest.raises(AblationError, match="--tune needs an ablation.tune section"):
        run_ablation(command(path, tmp_path, tiny_cache, "--tune"))
    with pytest.raises(AblationError, match="--tune tunes the arms of an ablation YAML"):
        parse_command_line(["fit", "--config", str(tmp_path / "missing.yaml"), "--tune"])


def test_jobs_come_from_the_yaml_or_the_command_line(tmp_path: Path) -> None:
    path = tuned_ablation(tmp_path, jobs=2)
    assert load_ablation(path).jobs == 2
    assert parse_command_line(["fit", "--config", str(path)]).jobs == 2
    parsed = parse_command_line(["fit", "--config", str(path), "--jobs", "3", "--trainer.max_steps", "2"])
    assert parsed.jobs == 3 and parsed.after == ["--trainer.max_steps", "2"]
    for bad in ("0", "x", "1.5"):
        with pytest.raises(AblationError, match="--jobs: expected a whole number"):
            parse_command_line(["fit", "--config", str(path), f"--jobs={bad}"])
    with pytest.raises(AblationError, match="ablation.jobs: expected a whole number"):
        load_ablation(tuned_ablation(tmp_path, jobs=0))


def test_child_runs_split_the_cores_unless_the_environment_says_otherwise(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert child_environment(2, {})["OMP_NUM_THREADS"] == "4"
    assert child_environment(3, {})["MKL_NUM_THREADS"] == "2"
    assert child_environment(16, {})["OMP_NUM_THREADS"] == "1"
    assert child_environment(2, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in child_environment(1, {})


# Each child marks that it started, then waits for the other's mark: only runs that overlap both succeed.
RENDEZVOUS = """
import os, sys, time
from pathlib import Path
mine, other = Path(sys.argv[1]), Path(sys.argv[2])
mine.touch()
print("threads", os.environ.get("OMP_NUM_THREADS"))
deadline = time.time() + 30
while not other.exists():
    if time.time() > deadline:
        sys.exit(4)
    time.sleep(0.05)
sys.exit(int(sys.argv[3]))
"""


def test_two_jobs_run_at_the_same_time_with_their_output_in_each_run_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    marks = [tmp_path / "a.started", tmp_path / "b.started"]
    launches, skipped = [], []
    for name, mine, other, status in (("a", *marks, 0), ("b", *reversed(marks), 3)):
        (tmp_path / name).mkdir()
        launches.append(Launch(name, tmp_path / name, lambda m=mine, o=other, s=status: [str(m), str(o), str(s)]))
    launches.append(Launch("done", tmp_path, lambda: skipped.append("done")))  # begin() None: skipped
    failures: list[tuple[str, int]] = []
    codes: dict[str, int] = {}
    run_launches(launches, 2, lambda _: 99, lambda *failure: failures.append(failure), codes,
                 program=[sys.executable, "-c", RENDEZVOUS])
    assert codes == {"a": 0, "b": 3} and failures == [("b", 3)] and skipped == ["done"]
    assert (tmp_path / "a" / LOG_FILE).read_text() == "threads 1\n"  # 2 cores // 2 jobs
    # One at a time, the inline runner runs each in turn (here: a stand-in that records the arguments).
    ran: list[list[str]] = []
    codes.clear()
    run_launches(launches[:1], 1, lambda arguments: ran.append(arguments) or 0, lambda *_: None, codes)
    assert ran == [[str(marks[0]), str(marks[1]), "0"]] and codes == {"a": 0}


def test_a_kept_key_holds_under_every_candidate_and_an_arm_that_trains_no_step_is_not_tuned(
    tmp_path: Path, tiny_cache: Path, monkeypatch
) -> None:
    # deep keeps its own rate (0.01) under both candidates; the un-continued reference (0 steps) is
    # measured, never tuned.
    configs = fake_tuning_runs(monkeypatch, {(2, 0.001): 3.1, (2, 0.01): 3.4, (3, 0.01): 3.0})
    path = tuned_ablation(tmp_path, {**TUNE, "keep": {"deep": ["model.optimizer.learning_rate"]}})
    document = yaml.safe_load(path.read_text())
    document["ablation"]["arms"]["untrained"] = {"trainer.max_steps": 0}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert run_ablation(command(path, tmp_path, tiny_cache, "--tune")) == 0
    assert [c["run"] for c in configs] == ["ref.slow", "ref.fast", "deep.slow", "deep.fast"]
    assert [c["model"]["optimizer"]["learning_rate"] for c in configs] == [0.001, 0.01, 0.01, 0.01]
    table = (tmp_path / "runs" / "tiny_tune" / "tuning.md").read_text()
    assert "`deep` keeps its own `model.optimizer.learning_rate` under every candidate." in table
    assert "| deep | 3.0000 | 3.0000 | slow | uses it |" in table  # its kept rate is its own, whichever wins
    assert "untrained" not in table
    with pytest.raises(AblationError, match="no selected arm trains a step"):
        run_ablation(command(path, tmp_path, tiny_cache, "--tune", "--arm", "untrained"))
