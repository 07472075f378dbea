"""The ablation runner: the arms of one YAML run as separate fits, then one table of them all."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from midus.ablation.config import Ablation, deep_merge, expand_dotted, load_ablation
from midus.ablation.runner import AblationError, run_ablation
from midus.cli import main
from midus.model import MidusLM, ModelConfig
from midus.training.cli import MidusCLI, cli_kwargs
from midus.training.run_summary import RunSummary

ROOT = Path(__file__).resolve().parents[1]


def tiny_base() -> dict:
    """The quickstart shrunk to seconds (as tests/test_cli.py's tiny_overrides), as a YAML base."""
    base = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    base["trainer"].update(val_check_interval=3, log_every_n_steps=2)  # max_steps comes from the command line
    base["model"]["config"].update(d_model=32, n_layers=2)
    base["model"]["probes"] = {"recall_questions": 20}
    base["data"]["embedded"].update(num_people=20, docs_per_person=3)
    base["data"].update(bpe_vocab_size=300, block_size=32, batch_size=8)
    return base


def write_ablation(tmp_path: Path, arms: dict, name: str | None = None, base: dict | None = None) -> Path:
    section = {"arms": arms} if name is None else {"name": name, "arms": arms}
    path = tmp_path / "ablate_tiny.yaml"
    document = yaml.safe_dump({"ablation": section, **(base or tiny_base())}, sort_keys=False)
    path.write_text(f"# python -m midus fit --config {path.name}\n{document}")
    return path


def command(path: Path, tmp_path: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(path), *extra,
        "--trainer.max_steps", "6",  # overrides the base's 500: command-line args come after each arm's config
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--data.cache_dir", str(cache),
    ]


def test_deep_merge_with_dotted_keys() -> None:
    base = {
        "model": {"config": {"d_model": 128, "n_heads": 4}, "optimizer": {"learning_rate": 0.003}},
        "trainer": {"callbacks": [1, 2]},
    }
    overrides = expand_dotted(
        {
            "model.config.d_model": 64,
            "model": {"config": {"n_layers": 2}},  # nested and dotted keys of one arm merge
            "trainer.callbacks": [3],
        }
    )
    assert overrides == {"model": {"config": {"d_model": 64, "n_layers": 2}}, "trainer": {"callbacks": [3]}}
    merged = deep_merge(base, overrides)
    assert merged == {
        "model": {"config": {"d_model": 64, "n_heads": 4, "n_layers": 2}, "optimizer": {"learning_rate": 0.003}},
        "trainer": {"callbacks": [3]},  # lists replace
    }
    assert base["model"]["config"]["d_model"] == 128  # the base is never modified


def test_arm_config_logs_to_experiment_and_arm(tmp_path: Path) -> None:
    ablation = load_ablation(write_ablation(tmp_path, {"same": None, "lr": {"model.optimizer.learning_rate": 0.01}}))
    assert isinstance(ablation, Ablation) and ablation.name == "ablate_tiny"  # the file's stem
    config = ablation.arm_config("lr")
    assert config["model"]["optimizer"]["learning_rate"] == 0.01 and config["model"]["config"]["d_model"] == 32
    logger = config["trainer"]["logger"]["init_args"]
    assert (logger["save_dir"], logger["name"], logger["version"]) == ("runs", "ablate_tiny", "lr")
    assert logger["default_hp_metric"] is False  # the base's other logger arguments stay
    assert "ablation" not in config and ablation.arm_config("same")["model"] == tiny_base()["model"]
    assert load_ablation(ROOT / "experiments" / "quickstart.yaml") is None


@pytest.mark.parametrize("arms", [{}, {"a/b": {}}, {"a": [1]}], ids=["no arms", "bad name", "not a mapping"])
def test_malformed_ablation_section(tmp_path: Path, arms: dict) -> None:
    with pytest.raises(AblationError, match="ablation:"):
        load_ablation(write_ablation(tmp_path, arms))


@pytest.mark.slow
def test_arms_run_end_to_end_and_are_tabulated(tmp_path: Path, tiny_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the arms' processes: tiny models gain nothing from threads
    path = write_ablation(tmp_path, name="tiny", arms={"small": {}, "wide": {"model.config.d_model": 48}})
    assert run_ablation(command(path, tmp_path, tiny_cache)) == 0

    experiment = tmp_path / "runs" / "tiny"
    summaries = {arm: json.loads((experiment / arm / "summary.json").read_text()) for arm in ("small", "wide")}
    for arm, summary in summaries.items():
        train, wall = summary["train"], summary["wall_time_s"]
        assert train["steps"] == train["batches"] == 6 and train["tokens"] == 6 * 8 * 32
        # The rate and the step time come from one sum of batch times: their product is the
        # tokens of one step, and that time (validation excluded) fits inside the run's wall time.
        assert train["tokens_per_sec"] * train["mean_step_time_s"] == pytest.approx(8 * 32, rel=1e-9)
        assert 0 < train["tokens"] / train["tokens_per_sec"] == pytest.approx(6 * train["mean_step_time_s"])
        assert train["tokens"] / train["tokens_per_sec"] < wall < 600
        assert summary["val"]["ppl"] == pytest.approx(math.exp(summary["val"]["loss"]), rel=1e-5)
        assert summary["val"]["best_loss"] <= summary["val"]["loss"]
        for key in ("recall_acc", "recall_acc_heldout"):  # a share of the 20 probe questions
            hits = summary["val"][key] * 20
            assert 0 <= hits <= 20 and hits == pytest.approx(round(hits), abs=1e-4), key
        config = yaml.safe_load((experiment / arm / "arm_config.yaml").read_text())["model"]["config"]
        expected_params = MidusLM(ModelConfig(**config, vocab_size=300)).num_parameters()
        assert summary["params"]["total"] == summary["params"]["trainable"] == expected_params
        assert summary["params"]["memory"] == 0 and summary["params"]["added"] == 0
        # The arm process's own peak RSS in bytes: torch alone takes well over 100 MiB (KiB
        # reported as bytes would be 1024 times smaller), and no process exceeds the machine.
        machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        assert summary["peak_memory"]["kind"] == "cpu_max_rss"
        assert 100 * 2**20 < summary["peak_memory"]["bytes"] < machine
        assert summary["config_paths"] == [str(experiment / arm / "arm_config.yaml")]
        assert list((experiment / arm).glob("events.out.tfevents.*")), f"no TensorBoard events for {arm}"
    assert summaries["wide"]["params"]["total"] > summaries["small"]["params"]["total"]

    rows = {row["arm"]: row for row in csv.DictReader((experiment / "summary.csv").open())}
    assert list(rows) == ["small", "wide"]
    for arm, summary in summaries.items():
        assert rows[arm]["status"] == "ok"
        assert int(rows[arm]["params_total"]) == summary["params"]["total"]
        assert float(rows[arm]["val_ppl"]) == pytest.approx(summary["val"]["ppl"])
        assert float(rows[arm]["train_tokens_per_sec"]) == pytest.approx(summary["train"]["tokens_per_sec"])
    table = (experiment / "summary.md").read_text()
    for arm, summary in summaries.items():
        total = f"{summary['params']['total']:,}"
        # total, added (0: no up-scaling), trainable (= total), memory (0), best val loss, val ppl
        best, ppl = summary["val"]["best_loss"], summary["val"]["ppl"]
        assert f"| {arm} | ok | {total} | 0 | {total} | 0 | {best:.3f} | {ppl:.2f} |" in table
        latency, wall = summary["latency"], summary["wall_time_s"]
        assert (latency["prompt_tokens"], latency["new_tokens"]) == (128, 32)
        # Milliseconds, measured: a forward of the tiny model takes more than 10 µs and (best of
        # 3, generating 33 tokens) far less than the whole run took.
        assert 0.01 < latency["prefill_ms"] < 1e3 * wall
        assert 0.01 < latency["decode_ms_per_token"] < 1e3 * wall / latency["new_tokens"]
        assert f"| {latency['prefill_ms']:.1f} | {latency['decode_ms_per_token']:.2f} |" in table


def fake_runs(monkeypatch, failing: str = "") -> list[list[str]]:
    """Replace the arms' processes by a recorder that returns at once (exit 1 for arm `failing`)."""
    calls: list[list[str]] = []

    def run(arm_command: list[str]) -> int:
        calls.append([sys.executable, "-m", "midus", *arm_command])
        arm = Path(arm_command[arm_command.index("--config") + 1]).parent.name
        return 1 if arm == failing else 0

    # Only the arms' processes: patching subprocess.run itself also caught libraries probing
    # their environment with it during parsing.
    monkeypatch.setattr("midus.ablation.runner.run_arm_process", run)
    return calls


def fake_finished_runs(monkeypatch, val_of: Callable[[Path, dict], dict], total_params: int = 100) -> None:
    """Replace the arms' processes by one that writes a finished summary at once: its ``val``
    section is ``val_of(arm_config path, arm config)``; the runner then skips the run on a rerun."""

    def run(arm_command: list[str]) -> int:
        arm_config = Path(arm_command[arm_command.index("--config") + 1])
        val = val_of(arm_config, yaml.safe_load(arm_config.read_text()))
        record = {"config_paths": [str(arm_config)], "params": {"total": total_params}, "val": val}
        (arm_config.parent / "summary.json").write_text(json.dumps(record))
        return 0

    monkeypatch.setattr("midus.ablation.runner.run_arm_process", run)


def test_arm_flag_runs_only_the_selected_arms(tmp_path: Path, tiny_cache: Path, monkeypatch) -> None:
    calls = fake_runs(monkeypatch)
    path = write_ablation(tmp_path, name="tiny", arms={"a": {}, "b": {"model.optimizer.learning_rate": 0.01}, "c": {}})
    # An arm of an earlier run, or one copied in from another machine, still gets its row.
    earlier = tmp_path / "runs" / "tiny" / "c" / "summary.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text(json.dumps({"params": {"total": 1234, "memory": 0}, "val": {"ppl": 9.5}}))

    assert run_ablation(command(path, tmp_path, tiny_cache, "--arm", "b")) == 0
    experiment = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in experiment.iterdir() if p.is_dir()) == ["b", "c"]
    [call] = calls
    arm_config = str(experiment / "b" / "arm_config.yaml")
    assert call[call.index("--config") + 1] == arm_config and "--arm" not in call
    assert call.index(arm_config) < call.index("--trainer.max_steps")  # command-line args come after the arm's config
    assert yaml.safe_load(Path(arm_config).read_text())["model"]["optimizer"]["learning_rate"] == 0.01
    table = (experiment / "summary.md").read_text()
    assert "| a | not run |" in table and "| c | ok | 1,234 |  |  | 0 |  | 9.50 |" in table

    calls.clear()  # repeated and comma-separated selections run in YAML order
    assert run_ablation(command(path, tmp_path, tiny_cache, "--arm", "c,a", "--arm=b")) == 0
    assert [call[call.index("--config") + 1].split("/")[-2] for call in calls] == ["a", "b", "c"]


def test_a_failed_arm_does_not_stop_the_others(tmp_path: Path, tiny_cache: Path, monkeypatch) -> None:
    calls = fake_runs(monkeypatch, failing="a")
    path = write_ablation(tmp_path, name="tiny", arms={"a": {}, "b": {}})
    stale = tmp_path / "runs" / "tiny" / "a" / "summary.json"  # from an earlier, successful run of arm a
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"params": {"total": 1}}))
    assert run_ablation(command(path, tmp_path, tiny_cache)) == 1
    assert len(calls) == 2 and not stale.exists()  # a failed run shows no stale numbers
    table = (tmp_path / "runs" / "tiny" / "summary.md").read_text()
    assert "| a | failed (exit 1) |" in table and "| b | not run |" in table  # the fake b wrote no summary
    with pytest.raises(SystemExit) as failure:  # on the command line: exit status 1 after the table
        main(command(path, tmp_path, tiny_cache))
    assert failure.value.code == 1


def test_unknown_arm_fails_before_anything_is_written(tmp_path: Path, tiny_cache: Path, monkeypatch, capsys) -> None:
    calls = fake_runs(monkeypatch)
    path = write_ablation(tmp_path, {"small": {}, "wide": {"model.config.d_model": 64}})
    with pytest.raises(AblationError, match=r"unknown arm\(s\) 'huge'; the arms are: small, wide"):
        run_ablation(command(path, tmp_path, tiny_cache, "--arm", "small,huge"))
    with pytest.raises(SystemExit) as failure:  # on the command line: a one-line error, exit 2
        main(command(path, tmp_path, tiny_cache, "--arm", "huge"))
    assert failure.value.code == 2 and "unknown arm" in str(failure.value.__cause__)
    assert not (tmp_path / "runs").exists() and not calls


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model.config.n_heads": 3}, "n_heads=3 must divide d_model=32"),
        ({"model.config.d_modle": 64}, "model.config.d_modle"),
        ({"trainer.max_steps": "many"}, "trainer.max_steps"),
    ],
    ids=["invalid model config", "misspelt key", "wrong type"],
)
def test_bad_arm_fails_naming_the_arm_before_anything_is_written(
    tmp_path: Path, tiny_cache: Path, monkeypatch, override: dict, message: str
) -> None:
    calls = fake_runs(monkeypatch)
    path = write_ablation(tmp_path, {"good": {}, "bad": override})
    with pytest.raises(AblationError, match="arm 'bad'") as failure:
        run_ablation(command(path, tmp_path, tiny_cache))
    assert message in str(failure.value)
    assert not (tmp_path / "runs").exists() and not calls  # the good arm did not run either


def test_only_fit_takes_an_ablation(tmp_path: Path, tiny_cache: Path) -> None:
    path = write_ablation(tmp_path, {"a": {}})
    args = command(path, tmp_path, tiny_cache)
    with pytest.raises(AblationError, match="only 'fit'.*config.yaml"):
        run_ablation(["validate", *args[1:]])


def test_fit_gets_one_run_summary(tmp_path: Path, tiny_cache: Path) -> None:
    base = tiny_base()
    args = ["--data.cache_dir", str(tiny_cache), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    for listed in (False, True):
        if listed:  # a YAML that lists the callback itself keeps exactly that one
            base["trainer"]["callbacks"].append({"class_path": "midus.training.run_summary.RunSummary"})
        path = tmp_path / f"listed_{listed}.yaml"
        path.write_text(yaml.safe_dump(base))
        cli = MidusCLI(**cli_kwargs(), run=False, args=["--config", str(path), *args])
        cli.before_fit()
        summaries = [cb for cb in cli.trainer.callbacks if isinstance(cb, RunSummary)]
        assert len(summaries) == 1 and summaries[0].config_paths == [str(path)]
