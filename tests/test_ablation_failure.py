"""An ablation arm whose real ``fit`` process crashes: reported failed, the other arm still runs and
gets its row, and the runner exits non-zero."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from midus.cli import main
from midus.report.table import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def tiny_base() -> dict:
    """The quickstart shrunk to seconds, as a YAML base (max_steps comes from the command line)."""
    base = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    base["trainer"].update(val_check_interval=3, log_every_n_steps=2)
    base["model"]["config"].update(d_model=32, n_layers=2)
    base["model"]["probes"] = {"recall_questions": 0}
    base["data"]["embedded"].update(num_people=30, docs_per_person=4)  # the corpus of the tiny_data fixture
    base["data"].update(bpe_vocab_size=300, block_size=32, batch_size=8)
    return base


@pytest.mark.slow
def test_an_arm_whose_fit_crashes_is_reported_failed_and_the_others_still_run(
    tmp_path: Path, tiny_cache: Path, tiny_data, monkeypatch, capfd
) -> None:
    # tiny_data: its corpus and BPE are this base's, so the arms find the tokenizer cached.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the arms' processes: tiny models gain nothing from threads
    missing = tmp_path / "never_trained" / "base.ckpt"
    # Valid to the runner's up-front check (it parses the config and builds model.config only); the
    # arm's own process fails when CausalLM loads the base that was never trained: a user error, exit 2.
    broken = {
        "model.upscale.base_checkpoint": str(missing),
        "model.upscale.method": "midus",
        "model.upscale.every": 1,
    }
    path = tmp_path / "ablate_crash.yaml"
    ablation = {"ablation": {"name": "crash", "arms": {"broken": broken, "small": {}}}, **tiny_base()}
    path.write_text(f"# python -m midus fit --config {path.name}\n{yaml.safe_dump(ablation, sort_keys=False)}")
    experiment = tmp_path / "runs" / "crash"
    stale = experiment / "broken" / "summary.json"  # from an earlier, successful run of the arm
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"params": {"total": 1}, "val": {"ppl": 2.0}}))

    with pytest.raises(SystemExit) as failure:
        main([
            "fit", "--config", str(path),
            "--trainer.max_steps", "6",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--data.cache_dir", str(tiny_cache),
        ])
    assert failure.value.code == 1
    out, err = capfd.readouterr()
    # The broken arm's process really ran and failed for the missing base (not for a typo in the test).
    assert f"model.upscale.base_checkpoint: {str(missing)!r} does not exist" in err
    assert "=== arm broken failed with exit code 2" in err

    # The broken arm ran first; the runner went on with the other arm, which finished.
    assert not stale.exists() and not (experiment / "broken" / "checkpoints").exists()
    summary = json.loads((experiment / "small" / "summary.json").read_text())
    assert summary["train"]["steps"] == 6 and summary["val"]["ppl"] > 1
    assert (experiment / "small" / "checkpoints" / "last.ckpt").is_file()

    rows = {row["arm"]: row for row in csv.DictReader((experiment / "summary.csv").open())}
    assert list(rows) == ["broken", "small"]
    assert rows["broken"]["status"] == "failed (exit 2)"
    assert rows["broken"]["params_total"] == rows["broken"]["val_ppl"] == ""  # no numbers for a crash
    assert rows["small"]["status"] == "ok"
    assert int(rows["small"]["params_total"]) == summary["params"]["total"] > 0
    assert float(rows["small"]["val_ppl"]) == pytest.approx(summary["val"]["ppl"])
    table = (experiment / "summary.md").read_text()
    total = f"{summary['params']['total']:,}"
    broken_row = "| " + " | ".join(["broken", "failed (exit 2)", *[""] * len(COLUMNS)]) + " |"
    best, ppl = summary["val"]["best_loss"], summary["val"]["ppl"]
    small_row = f"| small | ok | {total} | 0 | {total} | 0 | {best:.3f} | {ppl:.2f} |"
    assert broken_row + "\n" in table and small_row in table
    # The same table is printed after the arms ran.
    assert "Ablation crash" in out and "| broken | failed (exit 2) |" in out and small_row in out
