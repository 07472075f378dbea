"""Issue 26's columns: knowledge bits above the control per added and per trainable parameter, and the
efficiency claims (trainable parameters, optimizer state, peak memory, step time, decode latency) as
ratios to interleaved DUS, with their intervals over seeds and a caption saying how runs were timed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from test_ablation import command, fake_finished_runs, write_ablation
from test_report import write_events
from test_training import quiet_trainer, tiny_config

from midus.ablation.config import AblationError, load_ablation, parse_control
from midus.ablation.results import write_tables
from midus.ablation.runner import child_environment, run_ablation
from midus.ablation.tuning import tuning_ablation
from midus.probes import ProbeConfig
from midus.report.build import write_report
from midus.report.table import ArmRow, markdown_table, with_control
from midus.run_files import RUNS_AT_A_TIME_ENV
from midus.training import CausalLM
from midus.training.config import OptimizerConfig, ScheduleConfig
from midus.training.run_summary import RunSummary, timing_conditions
from midus.upscale import UpscaleConfig

T_975_DF2 = 4.302653  # Student's t, 97.5 % quantile, 2 degrees of freedom (3 seeds)
MIB = 2**20
SEEDS = (0, 1, 2)
# Hand-chosen runs. base (the control: nothing added, all 1,000 parameters train), dus (adds 400,
# trains all 1,400), mem (adds 200 and trains only those, the frozen protocol).
PARAMS = {"base": (1000, 0, 1000, 10), "dus": (1400, 400, 1400, 14), "mem": (1200, 200, 200, 4)}
"""arm -> (total, added, trainable parameters, trainable parameter tensors)."""
BITS = {"base": (1000, 1100, 900), "dus": (1400, 1540, 1260), "mem": (1100, 1150, 1000)}
PEAK_MIB = {"base": (70, 75, 72), "dus": (100, 110, 90), "mem": (80, 88, 81)}
STEP_S = {"base": (0.3, 0.3, 0.3), "dus": (0.5, 0.6, 0.4), "mem": (0.4, 0.45, 0.36)}
DECODE_MS = {"base": (1.0, 1.0, 1.0), "dus": (2.0, 2.0, 2.0), "mem": (3.0, 2.0, 2.5)}
TIMING = {"runs_at_a_time": 2, "torch_threads": 1, "cpu_cores": 2}


def record(arm: str, seed: int) -> dict:
    total, added, trainable, tensors = PARAMS[arm]
    bits = BITS[arm][seed]
    summary = {
        "device": "cpu",
        "params": {"total": total, "added": added, "trainable": trainable, "memory": 0},
        "val": {"best_loss": 3.0},
        "knowledge_bits": {"bits": bits, "bits_per_added_param": bits / added if added else None},
        "train": {"mean_step_time_s": STEP_S[arm][seed]},
        "latency": {"prefill_ms": 5.0, "decode_ms_per_token": DECODE_MS[arm][seed]},
        "peak_memory": {"bytes": PEAK_MIB[arm][seed] * MIB, "kind": "cpu_max_rss"},
        # AdamW: two fp32 moments per trainable parameter and an fp32 step per parameter tensor.
        "optimizer_state": {"bytes": 8 * trainable + 4 * tensors, "tensors": 3 * tensors},
        "timing": TIMING,
    }
    if (arm, seed) == ("base", 2):
        del summary["timing"]  # a summary written before timing was recorded
    return summary


def rows() -> list[ArmRow]:
    return [ArmRow(arm, "ok", record(arm, seed), seed) for arm in PARAMS for seed in SEEDS]


def section(markdown: str, heading: str) -> dict[str, dict[str, str]]:
    """The Markdown table under `heading` as {arm: {column title: cell}}."""
    after = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in after.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["arm"]: row for row in table}


def half_width(values: list[float]) -> float:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return T_975_DF2 * sd / math.sqrt(len(values))


def test_bits_above_the_control_per_added_and_trainable_param_with_intervals(tmp_path: Path) -> None:
    markdown = write_tables(tmp_path, "hand", rows(), references=["base", "dus"], control="base")
    means = section(markdown, "Mean over seeds 0, 1, 2")
    # dus - base = 400, 440, 360 bits (sd 40): per added param 1.0, 1.1, 0.9; per trainable param / 1,400.
    dus = means["dus"]
    assert dus["bits above control / added param"] == f"1.0000 ± {T_975_DF2 * 40 / 400 / math.sqrt(3):.4f}"
    assert dus["bits above control / trainable param"] == f"0.2857 ± {T_975_DF2 * 40 / 1400 / math.sqrt(3):.4f}"
    assert dus["all bits / added param"] == "3.5000 ± " + f"{half_width([3.5, 3.85, 3.15]):.4f}"  # every bit / 400
    # mem - base = 100, 50, 100 bits over 200 added (= trainable) parameters: 0.5, 0.25, 0.5.
    mem_values = [0.5, 0.25, 0.5]
    expected = f"{sum(mem_values) / 3:.4f} ± {half_width(mem_values):.4f}"
    assert means["mem"]["bits above control / added param"] == expected
    assert means["mem"]["bits above control / trainable param"] == expected
    # The control: nothing added (no value), and 0 bits above itself per trainable parameter.
    assert means["base"]["bits above control / added param"] == ""
    assert means["base"]["bits above control / trainable param"] == "0.0000"

    csv_rows = {row["arm"]: row for row in csv.DictReader((tmp_path / "summary_seeds.csv").open())}
    assert float(csv_rows["dus"]["bits_above_control_per_added_param_mean"]) == pytest.approx(1.0)
    low = float(csv_rows["dus"]["bits_above_control_per_added_param_ci95_low"])
    assert low == pytest.approx(1.0 - T_975_DF2 * 0.1 / math.sqrt(3), abs=1e-5)
    assert float(csv_rows["mem"]["bits_above_control_per_trainable_param_mean"]) == pytest.approx(5 / 12)
    per_run = {(row["arm"], row["seed"]): row for row in csv.DictReader((tmp_path / "summary.csv").open())}
    assert float(per_run["dus", "1"]["bits_above_control_per_added_param"]) == pytest.approx(1.1)

    # Paired against interleaved DUS, seed by seed: mem - dus per added param = -0.5, -0.85, -0.4.
    differences = [-0.5, -0.85, -0.4]
    mean, half = sum(differences) / 3, half_width(differences)
    paired = section(markdown, "Paired differences to dus")["mem"]
    assert paired["Δ bits above control / added param"] == (
        f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}] not distinguishable"
    )
    assert "Control: base (bits above control" in markdown
    assert json.loads((tmp_path / "ablation.json").read_text())["control"] == "base"


def test_efficiency_claims_pair_as_ratios_to_interleaved_dus_with_a_timing_caption(tmp_path: Path) -> None:
    markdown = write_tables(tmp_path, "hand", rows(), references=["base", "dus"], control="base")
    means = section(markdown, "Mean over seeds 0, 1, 2")
    assert means["mem"]["trainable params"] == "200"
    assert means["mem"]["optimizer state (MiB)"] == f"{(8 * 200 + 4 * 4) / MIB:,.2f}"
    assert means["dus"]["peak memory (MiB)"] == f"100.0 ± {half_width([100, 110, 90]):.1f}"

    paired = section(markdown, "Paired differences to dus")
    header = list(paired["mem"])
    # Differences first, then the costs as ratios: the efficiency claims side by side.
    assert header[-6:] == ["× trainable params", "× step ms", "× prefill ms", "× decode ms/token",
                           "× optimizer state (MiB)", "× peak memory (MiB)"]
    mem = paired["mem"]
    assert mem["× trainable params"] == "0.14× [0.14, 0.14] better"  # 200 / 1,400 in every seed
    state = (8 * 200 + 4 * 4) / (8 * 1400 + 4 * 14)
    assert mem["× optimizer state (MiB)"] == f"{state:.2f}× [{state:.2f}, {state:.2f}] better"
    for title, ratios in (("× peak memory (MiB)", [0.8, 0.8, 0.9]), ("× step ms", [0.8, 0.75, 0.9]),
                          ("× decode ms/token", [1.5, 1.0, 1.25])):
        mean, half = sum(ratios) / 3, half_width(ratios)
        verdict = "better" if mean + half < 1 else "worse" if mean - half > 1 else "not distinguishable"
        assert mem[title] == f"{mean:.2f}× [{mean - half:.2f}, {mean + half:.2f}] {verdict}", title
    assert mem["× peak memory (MiB)"].endswith(" better") and mem["× decode ms/token"].endswith("not distinguishable")

    assert markdown.startswith(
        "Timing (step ms, tokens/s, prefill and decode latency): 8 runs up to 2 at a time on cpu, 1 torch "
        "thread(s) each, 2 CPU core(s) available; 1 run with no timing record"
    )
    assert "Timing (step ms" in (tmp_path / "summary.md").read_text()


def test_one_run_per_arm_pairs_with_the_control_run_and_a_missing_control_leaves_cells_empty() -> None:
    unseeded = [ArmRow(arm, "ok", record(arm, 0)) for arm in ("base", "dus")]
    table = markdown_table(with_control(unseeded, "base"))
    assert "| 1.0000 | 0.2857 | 3.5000 |" in table  # (1,400 - 1,000) / 400 and / 1,400; 1,400 / 400
    failed_control = [ArmRow("base", "failed (exit 1)", record("base", 0)), unseeded[1]]
    assert with_control(failed_control, "base")[1].control is None  # only a finished control run counts
    assert "| 1.0000 |" not in markdown_table(with_control(failed_control, "base"))
    assert with_control(unseeded, None) == unseeded


def test_report_pairs_against_every_recorded_reference_and_subtracts_the_recorded_control(tmp_path: Path) -> None:
    experiment = tmp_path / "hand"
    for arm in PARAMS:
        for seed in SEEDS:
            run = experiment / arm / f"seed{seed}"
            write_events(run, {"val/loss": [(0, 7.0, 1.0), (9, 3.0, 2.0)]})
            (run / "summary.json").write_text(json.dumps(record(arm, seed)))
    layout = {"arms": list(PARAMS), "seeds": list(SEEDS), "reference": "base", "references": ["base", "dus"],
              "control": "base"}
    (experiment / "ablation.json").write_text(json.dumps(layout))
    report = write_report(experiment).read_text()
    assert "## Paired differences to base" in report and "## Paired differences to dus" in report
    assert section(report, "Paired differences to dus")["mem"]["× trainable params"] == "0.14× [0.14, 0.14] better"
    means = section(report, "Mean over seeds 0, 1, 2")
    assert means["dus"]["bits above control / added param"].startswith("1.0000 ± ")
    assert "Timing (step ms, tokens/s, prefill and decode latency): 8 runs up to 2 at a time" in report
    # --reference pairs against that arm alone; the recorded control stays.
    only_dus = write_report(experiment, reference="dus").read_text()
    assert "## Paired differences to base" not in only_dus and "Control: base" in only_dus
    # An ablation.json from before the control was recorded: its first reference is the control.
    (experiment / "ablation.json").write_text(json.dumps({"arms": list(PARAMS), "reference": "dus"}))
    earlier = write_report(experiment).read_text()
    assert "Control: dus" in earlier and "## Paired differences to base" not in earlier
    assert section(earlier, "Mean over seeds 0, 1, 2")["dus"]["bits above control / trainable param"] == "0.0000"


def test_the_control_is_the_first_reference_unless_named(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"

    def write(section: dict) -> Path:
        path.write_text(yaml.safe_dump({"ablation": section, "seed_everything": 0}))
        return path

    arms = {"base": {}, "dus": {}, "mem": {}}
    assert load_ablation(write({"arms": arms, "reference": ["base", "dus"]})).control == "base"
    assert load_ablation(write({"arms": arms, "reference": "dus", "control": "base"})).control == "base"
    assert load_ablation(write({"arms": arms})).control is None
    with pytest.raises(AblationError, match="control='z' is not an arm"):
        load_ablation(write({"arms": arms, "control": "z"}))
    tune = {"candidates": {"a": {"model.optimizer.learning_rate": 0.1}, "b": {"model.optimizer.learning_rate": 0.2}}}
    tuned = load_ablation(write({"arms": arms, "reference": "base", "tune": tune}))
    assert tuning_ablation(tuned, ["base"]).control is None  # the tuning runs' arms are candidates


def test_the_runner_records_the_control_and_its_runs_learn_how_many_ran_at_a_time(
    tmp_path: Path, tiny_cache: Path, monkeypatch
) -> None:
    fake_finished_runs(monkeypatch, lambda arm_config, config: {"best_loss": 3.0})
    path = write_ablation(tmp_path, name="tiny", arms={"ref": {}, "new": {}})
    document = yaml.safe_load(path.read_text())
    document["ablation"].update(seeds=[0], reference=["new", "ref"], control="ref")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert run_ablation(command(path, tmp_path, tiny_cache)) == 0
    experiment = tmp_path / "runs" / "tiny"
    assert json.loads((experiment / "ablation.json").read_text())["control"] == "ref"
    assert "Control: ref (bits above control" in (experiment / "summary.md").read_text()

    assert child_environment(2, {})[RUNS_AT_A_TIME_ENV] == "2" and child_environment(1, {})[RUNS_AT_A_TIME_ENV] == "1"
    monkeypatch.setenv(RUNS_AT_A_TIME_ENV, "2")
    assert timing_conditions()["runs_at_a_time"] == 2
    monkeypatch.delenv(RUNS_AT_A_TIME_ENV)
    conditions = timing_conditions()  # a fit outside the runner cannot know what else runs
    assert conditions["runs_at_a_time"] is None and conditions["torch_threads"] == 1 and conditions["cpu_cores"] >= 1


def test_a_real_fit_records_adamw_state_of_the_trainable_parameters_before_teardown(
    tiny_data, tmp_path: Path, monkeypatch
) -> None:
    pl.seed_everything(0)
    config = tiny_config(tiny_data.vocab_size)
    base_path = tmp_path / "base.ckpt"
    base_trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    base_trainer.fit(CausalLM(config, probes=ProbeConfig(recall_questions=0)), tiny_data)
    base_trainer.save_checkpoint(base_path)
    # Memory blocks after each base block, and only they train (LLaMA Pro's protocol).
    settings = UpscaleConfig(base_checkpoint=str(base_path), method="midus", every=1, trainable="new",
                             memory={"n_subkeys": 8, "topk": 4, "latent_dim": 8})
    module = CausalLM(config, upscale=settings, probes=ProbeConfig(recall_questions=0),
                      optimizer=OptimizerConfig(learning_rate=1e-2), schedule=ScheduleConfig(warmup_steps=1))
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < module.model.num_parameters()

    run_dir = tmp_path / "run"
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[RunSummary(latency_prompt_tokens=4,
                            latency_new_tokens=2)], default_root_dir=run_dir)
    written_before_teardown = []
    teardown = trainer.strategy.teardown

    def checked_teardown() -> None:  # Lightning's teardown moves a CUDA model to the CPU: too late to measure
        written_before_teardown.append((run_dir / "summary.json").is_file())
        teardown()

    monkeypatch.setattr(trainer.strategy, "teardown", checked_teardown)
    trainer.fit(module, tiny_data)
    assert written_before_teardown == [True]
    summary = json.loads((run_dir / "summary.json").read_text())
    # torch's AdamW: exp_avg and exp_avg_sq in fp32 per trainable parameter (8 bytes), and a
    # float32 step scalar per parameter tensor (4 bytes); nothing for the frozen base.
    count = sum(p.numel() for p in trainable)
    assert summary["params"]["trainable"] == count
    assert summary["optimizer_state"] == {"bytes": 8 * count + 4 * len(trainable), "tensors": 3 * len(trainable)}
    assert summary["device"] == "cpu" and summary["peak_memory"]["kind"] == "cpu_max_rss"
    assert summary["timing"]["torch_threads"] == 1

    # Resumed from its final checkpoint, the fit trains nothing (no on_train_end): on_fit_end still writes.
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    (run_dir / "summary.json").unlink()

    class TrainEnds(pl.Callback):
        def __init__(self) -> None:
            self.calls = 0

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.calls += 1

    train_ends = TrainEnds()
    again = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[RunSummary(latency_prompt_tokens=4,
                          latency_new_tokens=2), train_ends], default_root_dir=run_dir)
    again.fit(module, tiny_data, ckpt_path=str(tmp_path / "final.ckpt"), weights_only=False)  # this test's own file
    assert train_ends.calls == 0
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["train"]["steps"] == 3 and resumed["optimizer_state"] == summary["optimizer_state"]


def test_each_arm_subtracts_its_own_control_and_bad_controls_name_the_field(tmp_path: Path) -> None:
    # mem is frozen: its control is mem's own untrained start, here played by base with fewer bits.
    untrained = [ArmRow("untrained", "ok", record("base", seed) | {"knowledge_bits": {"bits": 100.0}}, seed)
                 for seed in SEEDS]
    controls = {"base": "base", "dus": "base", "untrained": "untrained", "mem": "untrained"}
    markdown = write_tables(tmp_path, "hand", rows() + untrained, references=["base"], control=controls)
    means = section(markdown, "Mean over seeds 0, 1, 2")
    per_seed = [(BITS["mem"][seed] - 100.0) / 200 for seed in SEEDS]
    assert means["mem"]["bits above control / added param"] == (
        f"{sum(per_seed) / 3:.4f} ± {half_width(per_seed):.4f}")
    dus = [(BITS["dus"][seed] - BITS["base"][seed]) / 400 for seed in SEEDS]
    assert means["dus"]["bits above control / added param"] == f"{sum(dus) / 3:.4f} ± {half_width(dus):.4f}"
    assert "Controls: base for base, dus; untrained for untrained, mem" in markdown
    assert json.loads((tmp_path / "ablation.json").read_text())["control"] == controls

    arms = {"base": {}, "base_continued": {}, "dus": {}, "dus_frozen": {}}
    fail = AblationError
    given = {"base": ["dus_frozen"], "base_continued": ["dus"]}
    assert parse_control(given, arms, fail) == {
        "base": "base", "dus_frozen": "base", "base_continued": "base_continued", "dus": "base_continued"}
    with pytest.raises(AblationError, match="control: 'wide' is not an arm"):
        parse_control({"base": ["wide"]}, arms, fail)
    with pytest.raises(AblationError, match="control: 'dus' has two controls, 'base' and 'base_continued'"):
        parse_control({"base": ["dus"], "base_continued": ["dus"]}, arms, fail)
    with pytest.raises(AblationError, match="control: expected an arm, or a mapping"):
        parse_control({"base": "dus"}, arms, fail)
