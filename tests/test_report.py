"""``python -m midus report``: report.md and plots of an experiment folder, from its files only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from midus.cli import main
from midus.report.arms import NoRunError, collect_arms
from midus.report.build import LOSS_PNG, PPL_PNG, write_report
from midus.report.plots import loss_curves, ppl_points
from midus.report.seed_bands import seed_bands

ROOT = Path(__file__).resolve().parents[1]
# (arm, n_layers, batch size): the arms differ in depth and in tokens per step.
ARMS = (("shallow", 1, 8), ("deep", 2, 4))
STEPS = 6


def fit_arm(save_dir: Path, cache: Path, arm: str, n_layers: int, batch_size: int) -> None:
    """One tiny in-process fit logging to ``save_dir/tiny/<arm>`` (val at steps 0, 2, 5; tokens every 2 steps)."""
    main([
        "fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"),
        "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.logger.init_args.name", "tiny", "--trainer.logger.init_args.version", arm,
        "--model.config.d_model", "32", "--model.config.n_layers", str(n_layers),
        "--model.probes.recall_questions", "8",
        "--data.embedded.num_people", "20", "--data.embedded.docs_per_person", "3",
        "--data.bpe_vocab_size", "300", "--data.block_size", "32", "--data.batch_size", str(batch_size),
        "--data.cache_dir", str(cache),
    ])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    """A real two-arm experiment folder (two tiny fits), shared by this module's tests: do not modify it."""

    save_dir = tmp_path_factory.mktemp("runs")
    for arm, n_layers, batch_size in ARMS:
        fit_arm(save_dir, tiny_cache, arm, n_layers, batch_size)
    return save_dir / "tiny"


def summaries(experiment: Path) -> dict[str, dict]:
    return {arm: json.loads((experiment / arm / "summary.json").read_text()) for arm, _, _ in ARMS}


def table_rows(report: str) -> dict[str, dict[str, str]]:
    """The report's Markdown table as {arm: {column title: cell}}."""
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["arm"]: row for row in rows}


def copy_arm(source: Path, destination: Path) -> None:
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("checkpoints"))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[1] > 100 and image.shape[0] > 100
    assert image[..., :3].std() > 0.01, f"{path.name} is blank"


@pytest.mark.slow
def test_report_renders_from_a_tiny_experiment_with_two_arms(experiment: Path, tmp_path: Path) -> None:
    out = write_report(experiment, tmp_path / "out" / "report.md")
    report = out.read_text()
    assert report.startswith("# Report: tiny\n")
    rows = table_rows(report)
    assert list(rows) == ["deep", "shallow"]  # no summary.csv: by name
    for arm, summary in summaries(experiment).items():
        row = rows[arm]
        assert row["status"] == "ok"
        assert row["val ppl"] == f"{summary['val']['ppl']:.2f}"
        assert row["best val loss"] == f"{summary['val']['best_loss']:.3f}"
        assert row["tokens trained"] == f"{summary['train']['tokens']:,}"
        assert row["total params"] == f"{summary['params']['total']:,}" and row["added params"] == "0"
        # The efficiency columns are summary.json's measurements, formatted (bytes shown in MiB).
        train, latency = summary["train"], summary["latency"]
        assert row["train tokens/s"] == f"{train['tokens_per_sec']:,.0f}"
        assert row["step ms"] == f"{train['mean_step_time_s'] * 1e3:.0f}"
        assert row["prefill ms"] == f"{latency['prefill_ms']:.1f}"
        assert row["decode ms/token"] == f"{latency['decode_ms_per_token']:.2f}"
        assert row["peak memory (MiB)"] == f"{summary['peak_memory']['bytes'] / 2**20:,.1f}"
        assert row["memory measured as"] == summary["peak_memory"]["kind"] == "cpu_max_rss"
        source = "table from summary.json; curve: 3 val/loss point(s) from 1 event file(s), tokens from train/tokens"
        assert f"- `{arm}`: {source}." in report
    assert rows["deep"]["total params"] != rows["shallow"]["total params"]
    assert f"]({LOSS_PNG})" in report and f"]({PPL_PNG})" in report
    assert_png(out.parent / LOSS_PNG)
    assert_png(out.parent / PPL_PNG)
    assert not (experiment / "report.md").exists()  # --out elsewhere: the experiment folder is untouched


@pytest.mark.slow
def test_loss_is_plotted_against_training_tokens(experiment: Path) -> None:
    arms = collect_arms(experiment)
    curves, xlabel, notes = loss_curves(arms)
    assert xlabel == "training tokens" and notes == [] and set(curves) == {"shallow", "deep"}
    for arm, summary in summaries(experiment).items():
        tokens, loss = curves[arm]
        per_step = summary["train"]["tokens"] / summary["train"]["steps"]
        assert tokens[0] == 0 and np.all(np.diff(tokens) > 0)  # the untrained point, then growing
        assert tokens[-1] == pytest.approx(summary["train"]["tokens"], abs=per_step)
        assert loss[-1] == pytest.approx(summary["val"]["loss"], rel=1e-6)
    # Same steps, half the batch: tokens, not steps, on the x-axis.
    assert curves["deep"][0][-1] == pytest.approx(curves["shallow"][0][-1] / 2)
    points, label, _ = ppl_points(arms)
    # No arm up-scaled (0 added parameters): perplexity against the total parameter count.
    assert label == "total parameters (no arm added any)"
    for arm, summary in summaries(experiment).items():
        assert points[arm] == pytest.approx((summary["params"]["total"], summary["val"]["ppl"]))


@pytest.mark.slow
def test_arm_without_summary_json_gets_its_row_from_event_files(experiment: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    for arm, _, _ in ARMS:
        copy_arm(experiment / arm, copy / arm)
    (copy / "deep" / "summary.json").unlink()  # crashed, or still running
    report = write_report(copy).read_text()
    row, summary = table_rows(report)["deep"], summaries(experiment)["deep"]
    assert row["status"] == "no summary.json; from event files"
    assert row["val ppl"] == f"{summary['val']['ppl']:.2f}"
    assert row["best val loss"] == f"{summary['val']['best_loss']:.3f}"
    assert row["total params"] == f"{summary['params']['total']:,}"  # from hparams.yaml
    assert row["tokens trained"] == f"{summary['train']['tokens']:,}"
    assert "- `deep`: no summary.json: table from 1 event file(s) and hparams.yaml (params)" in report
    assert table_rows(report)["shallow"]["status"] == "ok"


@pytest.mark.slow
def test_arm_copied_from_another_machine_still_reports(experiment: Path, tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "elsewhere" / "runs" / "merged"
    copy_arm(experiment / "shallow", other / "shallow")
    (other / "summary.csv").write_text("arm,status\nshallow,ok\nmissing,not run\n")
    monkeypatch.chdir(tmp_path)  # relative paths, from another working directory
    main(["report", "elsewhere/runs/merged"])
    report = (other / "report.md").read_text()
    assert report.startswith("# Report: merged\n")
    row = table_rows(report)["shallow"]
    assert row["status"] == "ok" and row["val ppl"] == f"{summaries(experiment)['shallow']['val']['ppl']:.2f}"
    assert_png(other / LOSS_PNG)


def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    (empty / "arm" / "checkpoints").mkdir(parents=True)
    (empty / "arm" / "hparams.yaml").write_text("params/total: 1\n")
    with pytest.raises(ValueError, match=r"empty holds no run: expected <arm>/events\.out\.tfevents\.\* files"):
        write_report(empty)
    with pytest.raises(FileNotFoundError, match="missing is not a folder"):
        write_report(tmp_path / "missing", tmp_path / "out" / "report.md")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(empty), "--out", str(tmp_path / "out" / "report.md")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no run" in err and str(empty) in err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "empty", "empty/arm", "empty/arm/checkpoints", "empty/arm/hparams.yaml"]


def write_events(arm_dir: Path, scalars: dict[str, list[tuple[int, float, float]]]) -> None:
    """One event file of (step, value, wall time) points per tag, as a (resumed) run writes."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(arm_dir))
    for tag, points in scalars.items():
        for step, value, wall_time in points:
            writer.add_scalar(tag, value, step, walltime=wall_time)
    writer.close()


def test_event_files_merge_by_step_and_resumed_tokens_keep_counting(tmp_path: Path) -> None:
    arm = tmp_path / "exp" / "resumed"
    # First process: steps 0-3, killed after step 3 (its step-3 validation was never checkpointed).
    write_events(arm, {"val/loss": [(0, 6.0, 1.0), (1, 5.0, 2.0), (3, 4.5, 4.0)],
                       "train/tokens": [(1, 100.0, 2.0), (3, 200.0, 4.0)]})
    # Resumed from step 1: its tokens count from 0 again, its step 3 replaces the first one's.
    write_events(arm, {"val/loss": [(3, 4.0, 10.0), (5, 3.0, 12.0)],
                       "train/tokens": [(3, 100.0, 10.0), (5, 200.0, 12.0)]})
    [resumed] = collect_arms(tmp_path / "exp")
    assert resumed.event_files == 2 and resumed.scalars["val/loss"] == [(0, 6.0), (1, 5.0), (3, 4.0), (5, 3.0)]
    curves, xlabel, _ = loss_curves([resumed])
    assert xlabel == "training tokens" and list(curves["resumed"][0]) == [0, 100, 200, 300]
    assert resumed.record["val"]["best_loss"] == 3.0 and resumed.record["train"]["steps"] == 6


def test_tokens_fall_back_to_summary_json_then_to_steps(tmp_path: Path) -> None:
    # Events directly in the folder: one arm named after it, plotted against the step.
    write_events(tmp_path / "solo", {"val/loss": [(0, 6.0, 1.0), (9, 5.0, 2.0)]})
    out = write_report(tmp_path / "solo")
    curves, xlabel, notes = loss_curves(collect_arms(tmp_path / "solo"))
    assert xlabel == "optimizer step (training tokens unknown)" and list(curves["solo"][0]) == [0, 9]
    report = out.read_text()
    assert "No arm logged training tokens" in report and "`solo` left off the perplexity plot" in report
    assert_png(out.parent / LOSS_PNG)

    # Tokens from summary.json's tokens per step; an arm with neither is left off, with a note.
    write_events(tmp_path / "exp" / "counted", {"val/loss": [(0, 6.0, 1.0), (2, 5.0, 2.0), (5, 4.0, 3.0)]})
    (tmp_path / "exp" / "counted" / "summary.json").write_text(json.dumps({"train": {"tokens": 600, "steps": 6}}))
    write_events(tmp_path / "exp" / "uncounted", {"val/loss": [(0, 6.0, 1.0), (9, 5.0, 2.0)]})
    curves, xlabel, notes = loss_curves(collect_arms(tmp_path / "exp"))
    assert xlabel == "training tokens" and list(curves) == ["counted"]
    assert list(curves["counted"][0]) == [0, 300, 600]  # a value logged at step s follows s + 1 steps
    assert notes == ["`uncounted` left off the loss plot: no train/tokens logged and no summary.json train.tokens."]


def test_seeded_runs_are_drawn_as_bands_and_tabulated_with_intervals(tmp_path: Path) -> None:
    experiment = tmp_path / "exp"
    final = {("ref", 0): 5.0, ("ref", 1): 5.4, ("ref", 2): 4.6, ("new", 0): 4.8, ("new", 1): 5.3, ("new", 2): 4.35}
    for (arm, seed), loss in final.items():
        run = experiment / arm / f"seed{seed}"
        write_events(run, {"val/loss": [(0, 7.0, 1.0), (9, loss, 2.0)], "train/tokens": [(9, 1000.0, 2.0)]})
        record = {"params": {"total": 100, "added": 10}, "val": {"ppl": float(np.exp(loss)), "best_loss": loss},
                  "train": {"tokens": 1000, "steps": 10}}
        (run / "summary.json").write_text(json.dumps(record))
    # A seed still running (events, no summary.json) is listed but enters no mean.
    write_events(experiment / "new" / "seed3", {"val/loss": [(0, 7.0, 1.0), (4, 1.0, 2.0)]})
    layout = {"arms": ["ref", "new"], "seeds": [0, 1, 2], "reference": "ref"}
    (experiment / "ablation.json").write_text(json.dumps(layout))
    runs = collect_arms(experiment)
    assert [(run.name, run.arm, run.seed) for run in runs] == [
        ("new/seed0", "new", 0), ("new/seed1", "new", 1), ("new/seed2", "new", 2), ("new/seed3", "new", 3),
        ("ref/seed0", "ref", 0), ("ref/seed1", "ref", 1), ("ref/seed2", "ref", 2),
    ]
    curves, _, _ = loss_curves(runs)
    finished = [run for run in runs if run.status == "ok"]
    bands, _ = seed_bands(curves, finished)
    assert bands["new"].seeds == 3 and list(bands["new"].x) == [0, 1000]
    assert bands["new"].mean[1] == pytest.approx((4.8 + 5.3 + 4.35) / 3)
    assert (bands["new"].low[1], bands["new"].high[1]) == pytest.approx((4.35, 5.3))

    report = write_report(experiment).read_text()
    assert "## Mean over seeds 0, 1, 2" in report and "## Paired differences to ref" in report  # from ablation.json
    # new - ref = -0.2, -0.1, -0.25: lower in every seed, yet 3 seeds' t-interval still reaches 0.
    assert "| new | 3 | -0.183 [-0.373, 0.006] not distinguishable |" in report
    assert "| new/seed1 | ok |" in report and "| new/seed3 | no summary.json; from event files |" in report
    assert "| new | 3 | 100 | 10 | " in report
    for png in (LOSS_PNG, PPL_PNG):
        assert_png(experiment / png)
    with pytest.raises(NoRunError, match="--reference 'nope'"):
        write_report(experiment, reference="nope")
