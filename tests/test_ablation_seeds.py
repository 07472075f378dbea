"""Seeded ablations: every arm once per seed, means with 95 % t-intervals, paired verdicts against a reference."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from test_ablation import command, fake_finished_runs, tiny_base, write_ablation

from midus.ablation.command_line import parse_command_line
from midus.ablation.config import AblationError, load_ablation
from midus.ablation.results import HPARAMS_EVENTS_GLOB
from midus.ablation.runner import run_ablation
from midus.report.intervals import (
    BETTER,
    UNDECIDED,
    WORSE,
    mean_interval,
    paired_difference,
    paired_ratio,
    ratio_verdict,
    t_quantile,
    verdict,
)
from midus.report.seed_table import paired_table
from midus.report.table import COLUMNS, ArmRow


@pytest.mark.parametrize(
    ("df", "printed"), [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)]
)
def test_t_quantile_matches_the_printed_table(df: int, printed: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(printed, abs=1e-4)


def test_mean_interval_is_the_student_t_interval() -> None:
    interval = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3
    half = 4.302653 / math.sqrt(3)
    assert (interval.mean, interval.n) == (2.0, 3)
    assert interval.low == pytest.approx(2 - half, abs=1e-5) and interval.high == pytest.approx(2 + half, abs=1e-5)
    single = mean_interval([5.0])
    assert single.low is None and single.half_width is None  # one value: no interval


def test_paired_differences_use_common_seeds_and_give_verdicts() -> None:
    # Seed effects (+0, +1, +2) shared by both arms cancel in the pairing: the difference is a constant -0.1.
    reference = {0: 3.0, 1: 4.0, 2: 5.0}
    arm = {0: 2.9, 1: 3.9, 2: 4.9, 7: 0.0}  # seed 7 has no partner and does not count
    difference = paired_difference(arm, reference)
    assert difference.n == 3 and difference.mean == pytest.approx(-0.1)
    assert difference.high < 0  # without pairing, the seed spread (sd 1) would swamp -0.1
    assert verdict(difference, "lower") == BETTER and verdict(difference, "higher") == WORSE
    noisy = paired_difference({0: 2.0, 1: 4.5, 2: 5.1}, reference)
    assert verdict(noisy, "lower") == UNDECIDED
    assert verdict(paired_difference({0: 1.0}, {0: 2.0}), "lower") == UNDECIDED  # one seed: no interval
    assert paired_difference({1: 1.0}, {0: 2.0}) is None


def test_costs_pair_as_ratios_judged_against_one() -> None:
    # Step times that differ by seed (a busier machine in seed 1) but always 1.5x the reference's.
    reference, arm = {0: 100.0, 1: 200.0, 2: 120.0}, {0: 150.0, 1: 300.0, 2: 180.0}
    ratio = paired_ratio(arm, reference)
    assert ratio.mean == pytest.approx(1.5) and ratio.low == pytest.approx(1.5)  # no spread in the ratio
    assert ratio_verdict(ratio, "lower") == WORSE and ratio_verdict(paired_ratio(reference, arm), "lower") == BETTER
    assert ratio_verdict(paired_ratio({0: 1.0, 1: 1.2}, {0: 1.1, 1: 1.0}), "lower") == UNDECIDED
    assert paired_ratio({0: 1.0}, {0: 0.0}) is None  # a zero reference has no ratio
    rows = [
        ArmRow(name, "ok", {"train": {"mean_step_time_s": times[seed] / 1e3}}, seed)
        for name, times in (("ref", reference), ("slow", arm))
        for seed in times
    ]
    table = paired_table(rows, [c for c in COLUMNS if c.name == "train_step_ms"], "ref")
    assert "| arm | common seeds | × step ms |" in table and "| slow | 3 | 1.50× [1.50, 1.50] worse |" in table


def test_seeds_and_reference_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    base = {"seed_everything": 0, "trainer": {"logger": True}}

    def write(section: dict) -> Path:
        path.write_text(yaml.safe_dump({"ablation": section, **base}))
        return path

    ablation = load_ablation(write({"arms": {"x": {}, "y": {}}, "seeds": [2, 0], "reference": "x"}))
    assert ablation.seeds == [2, 0] and ablation.reference == "x"
    config = ablation.arm_config("y", 2)
    assert config["seed_everything"] == 2
    assert config["trainer"]["logger"]["init_args"]["version"] == "y/seed2"
    for bad in ([], [0, 0], [-1], ["a"], 1.5, [True]):
        with pytest.raises(AblationError, match="ablation.seeds"):
            load_ablation(write({"arms": {"x": {}}, "seeds": bad}))
    with pytest.raises(AblationError, match="reference='z' is not an arm"):
        load_ablation(write({"arms": {"x": {}}, "reference": "z"}))
    with pytest.raises(AblationError, match="cannot set seed_everything"):
        load_ablation(write({"arms": {"x": {"seed_everything": 3}}, "seeds": [0]}))
    # --seeds replaces the YAML's list; --seed_everything cannot be combined with seeds.
    write({"arms": {"x": {}}, "seeds": [0]})
    assert parse_command_line(["fit", "--config", str(path), "--seeds", "3,4"]).seeds == [3, 4]
    assert parse_command_line(["fit", "--config", str(path), "--seeds=5"]).after == []
    with pytest.raises(AblationError, match="--seed_everything"):
        parse_command_line(["fit", "--config", str(path), "--seed_everything", "1"])
    with pytest.raises(AblationError, match="--seeds"):
        parse_command_line(["fit", "--config", str(path), "--seeds", "0,x"])


def fake_seeded_runs(monkeypatch, best_loss: dict[tuple[str, int], float]) -> list[str]:
    """Arm processes that write a finished summary (the runner then skips them on a rerun)."""
    started: list[str] = []

    def val_of(arm_config: Path, config: dict) -> dict:
        arm, seed = arm_config.parent.parent.name, int(arm_config.parent.name.removeprefix("seed"))
        assert config["seed_everything"] == seed
        started.append(f"{arm}/seed{seed}")
        return {"best_loss": best_loss[arm, seed]}

    fake_finished_runs(monkeypatch, val_of)
    return started


def test_a_seeded_ablation_runs_every_arm_per_seed_and_tabulates_intervals(
    tmp_path: Path, tiny_cache: Path, monkeypatch
) -> None:
    best = {("ref", 0): 3.0, ("ref", 1): 3.5, ("ref", 2): 4.0, ("new", 0): 2.8, ("new", 1): 3.31, ("new", 2): 3.79}
    started = fake_seeded_runs(monkeypatch, best)
    path = write_ablation(tmp_path, name="tiny", arms={"ref": {}, "new": {"model.optimizer.learning_rate": 0.01}})
    document = yaml.safe_load(path.read_text())
    document["ablation"].update(seeds=[0, 1], reference="ref")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    # The command line's seeds replace the YAML's [0, 1].
    assert run_ablation(command(path, tmp_path, tiny_cache, "--seeds", "0,1,2")) == 0
    assert started == ["ref/seed0", "ref/seed1", "ref/seed2", "new/seed0", "new/seed1", "new/seed2"]
    experiment = tmp_path / "runs" / "tiny"

    means = {row["arm"]: row for row in csv.DictReader((experiment / "summary_seeds.csv").open())}
    expected = mean_interval([2.8, 3.31, 3.79])
    assert float(means["new"]["val_best_loss_mean"]) == pytest.approx(expected.mean)
    assert float(means["new"]["val_best_loss_ci95_low"]) == pytest.approx(expected.low)
    assert int(means["new"]["val_best_loss_n"]) == 3
    per_run = [(row["arm"], row["seed"]) for row in csv.DictReader((experiment / "summary.csv").open())]
    assert per_run == [("ref", "0"), ("ref", "1"), ("ref", "2"), ("new", "0"), ("new", "1"), ("new", "2")]

    table = (experiment / "summary.md").read_text()
    assert "| new | 3 | 100 |" in table and f"{expected.mean:.3f} ± {expected.half_width:.3f}" in table
    # new - ref = -0.2, -0.19, -0.21: a consistent improvement the seed spread (0.5) would hide.
    difference = paired_difference({0: -0.2, 1: -0.19, 2: -0.21}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert f"| new | 3 | {difference.mean:.3f} [{difference.low:.3f}, {difference.high:.3f}] better |" in table
    assert "Student-t" in table and "## Every run" in table and "| new/seed2 | ok |" in table
    # Every run is a TensorBoard HParams session with its seed and overridden field.
    for label in ("ref/seed0", "new/seed2"):
        [session] = (experiment / label).glob(HPARAMS_EVENTS_GLOB)
        assert session.stat().st_size > 0

    # A list of references: a paired table against each, the first recorded for report.
    document["ablation"]["reference"] = ["ref", "new"]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert run_ablation(command(path, tmp_path, tiny_cache, "--seeds", "0,1,2")) == 0
    table = (experiment / "summary.md").read_text()
    assert "## Paired differences to ref" in table and "## Paired differences to new" in table
    assert f"| ref | 3 | {-difference.mean:.3f} [{-difference.high:.3f}, {-difference.low:.3f}] worse |" in table
    record = json.loads((experiment / "ablation.json").read_text())
    assert record["reference"] == "ref" and record["references"] == ["ref", "new"]
    with pytest.raises(AblationError, match=r"reference=\['ref', 'x'\] is not an arm or a list of arms"):
        document["ablation"]["reference"] = ["ref", "x"]
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        load_ablation(path)
    document["ablation"]["reference"] = "ref"
    path.write_text(yaml.safe_dump(document, sort_keys=False))

    # A rerun skips every finished seed; a seed added later runs alone.
    started.clear()
    assert run_ablation(command(path, tmp_path, tiny_cache, "--seeds", "0,1,2")) == 0
    assert started == []
    best.update({("ref", 3): 3.1, ("new", 3): 2.9})
    assert run_ablation(command(path, tmp_path, tiny_cache, "--seeds", "0,1,2,3", "--arm", "new")) == 0
    assert started == ["new/seed3"]


@pytest.mark.slow
def test_seeds_change_the_training_run_and_the_same_seed_repeats_it(
    tmp_path: Path, tiny_cache: Path, monkeypatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = tiny_base()
    path = write_ablation(tmp_path, name="tiny", arms={"a": {}}, base=base)
    document = yaml.safe_load(path.read_text())
    document["ablation"]["seeds"] = [0, 1]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert run_ablation(command(path, tmp_path, tiny_cache)) == 0
    arm = tmp_path / "runs" / "tiny" / "a"
    loss = {seed: json.loads((arm / f"seed{seed}" / "summary.json").read_text())["val"]["loss"] for seed in (0, 1)}
    assert loss[0] != loss[1]  # initialisation and data order follow the seed
    assert list((arm / "seed0").glob("events.out.tfevents.*"))
    assert (arm / "seed1" / "checkpoints" / "last.ckpt").is_file()
    # The corpus is the same for both seeds (its population has its own seed): one prepared cache.
    saved = [yaml.safe_load((arm / f"seed{seed}" / "config.yaml").read_text()) for seed in (0, 1)]
    assert saved[0]["data"] == saved[1]["data"] and [s["seed_everything"] for s in saved] == [0, 1]
    # Seed 0 again, as a plain fit of its saved config, gives the same loss bit for bit.
    again = tmp_path / "again"
    from midus.cli import main

    main(["fit", "--config", str(arm / "seed0" / "config.yaml"), "--trainer.logger.init_args.save_dir", str(again)])
    repeat = json.loads(next(again.rglob("summary.json")).read_text())["val"]["loss"]
    assert repeat == loss[0]
