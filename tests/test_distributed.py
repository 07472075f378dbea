"""Two processes (Lightning's DDP on CPU, gloo) report what one does, and write their files once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from midus.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2",
    "--model.config.d_model", "32", "--model.config.n_layers", "3", "--model.config.n_heads", "4",
    "--model.config.n_kv_heads", "2", "--model.config.memory_layers", "[1]", "--model.config.memory_branch", "hml",
    "--model.config.memory.n_subkeys", "16", "--model.config.memory.topk", "4",
    "--model.config.memory.latent_dim", "8", "--model.config.memory.zero_init_values", "false",
    "--model.probes.recall_questions", "25",
    "--data.embedded.num_people", "20", "--data.embedded.docs_per_person", "3", "--data.bpe_vocab_size", "300",
    "--data.block_size", "32", "--data.batch_size", "4",
]

# Runs `python -m midus` in-process and writes the final metrics of process 0 as JSON: Lightning's
# DDP launcher starts the second process by running this same script again.
RUNNER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from midus.cli import main
    out, args = sys.argv[1], sys.argv[2:]
    cli = main(args)
    if cli.trainer.is_global_zero:
        metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
        open(out, "w").write(json.dumps(metrics))
""")


def _run(tmp_path: Path, name: str, args: list[str]) -> tuple[dict[str, float], str]:
    script = tmp_path / "run_midus.py"
    script.write_text(RUNNER)
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(out), *args], capture_output=True, text=True, env=env, timeout=400
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout + done.stderr


DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


@pytest.mark.slow
def test_two_process_fit_then_validate_matches_one_process(tmp_path: Path) -> None:
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    common = [
        "--config", str(ROOT / "experiments" / "quickstart.yaml"), *TINY,
        "--trainer.logger.init_args.save_dir", str(runs), "--data.cache_dir", str(cache),
    ]
    fit_metrics, output = _run(
        tmp_path, "fit", ["fit", *common, *DDP, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
                            "--trainer.num_sanity_val_steps", "0"]
    )
    # The first process prepares the data; the second reads the cache (no second tokenizer or packing).
    # (datasets' progress bar prints a 0 % line when a map starts.)
    assert len(re.findall(r"packing training into blocks of 32: +0%", output)) == 1, output[-3000:]
    run = runs / "quickstart" / "ffn"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["processes"] == 2
    assert summary["train"]["steps"] == 4
    # 4 steps x 2 processes x 4 sequences x 32 predicted tokens, and the global batch of one step.
    assert summary["train"]["tokens"] == 4 * 2 * 4 * 32
    assert summary["train"]["global_batch_tokens"] == 2 * 4 * 32
    assert summary["val"]["loss"] == pytest.approx(fit_metrics["val/loss"])

    checkpoint = str(run / "checkpoints" / "last.ckpt")
    evaluate = ["validate", "--config", str(run / "config.yaml"), "--ckpt_path", checkpoint]
    evaluate += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    two, _ = _run(tmp_path, "two", evaluate + DDP)
    cli = main(evaluate + ["--trainer.devices", "1", "--trainer.strategy", "auto"])
    one = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
    assert one.keys() == two.keys()
    assert {"val/loss", "val/ppl", "val/recall_acc", "val/recall_acc_heldout", "memory/1/usage"} <= one.keys()
    # Losses: token-weighted means summed in another order (rel 1e-5); a zeroed-memory loss delta is
    # the difference of two such losses, so it gets their absolute error; recall and counts: exact sums.
    loss_error = 2e-5 * one["val/loss"]
    for name in one:
        error = loss_error if name.endswith("loss_delta") else 1e-6
        assert two[name] == pytest.approx(one[name], rel=1e-5, abs=error), name
