"""The one-GPU recipes (experiments/gpu/llama32_1b.yaml, smollm2_360m.yaml) run as their CPU twins: the
same YAML, an arm of it, with tiny stand-in sizes on the command line, on a random Llama built here
(tests/hf_standins.py) and parquet shards written here. And benchmarks/gpu_check.py runs every section
at toy size on the CPU (its GPU numbers are recorded in experiments/README.md when a GPU is lent).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from midus.ablation.command_line import parse_command_line
from midus.ablation.runner import plan_arm
from midus.checkpoint.kit import read_kit_checkpoint
from midus.cli import main
from tests.hf_standins import BOS, STANDIN_TEXT, llama3_standin, write_parquet_shards

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"llama32_1b": 2, "smollm2_360m": 4}  # recipe -> the stand-in's blocks (its `every` inserts 1)
SHAPES = {  # the real bases' shapes (their config.json), and the card each recipe is sized for, in GiB
    "llama32_1b": (dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                        tie_embeddings=True), 80),
    "smollm2_360m": (dict(vocab_size=49152, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_hidden=2560,
                          tie_embeddings=True), 24),
}


def twin_overrides(tmp_path: Path, base: Path, shards: list[Path]) -> list[str]:
    """The CPU twin: tiny sizes for everything the recipe sizes for a GPU; its choices stay."""
    return [
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "3", "--trainer.accumulate_grad_batches", "2",
        "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.upscale.base_checkpoint", str(base), "--model.upscale.memory.n_subkeys", "8",
        "--model.upscale.memory.topk", "4", "--model.upscale.memory.latent_dim", "8",
        "--model.optimizer.fused", "false", "--model.compute.loss_chunk_tokens", "24",
        "--model.schedule.warmup_steps", "1",
        "--data.source", "files", "--data.files.train", json.dumps([str(path) for path in shards]),
        "--data.hub.dataset", "", "--data.hub.config", "", "--data.files.val_fraction", "0.1",
        "--data.shards.max_tokens", "20000", "--data.block_size", "32", "--data.batch_size", "2",
        "--data.cache_dir", str(tmp_path / "cache"),
    ]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_arm_of_the_recipe_plans_and_its_midus_arm_trains_as_a_cpu_twin(recipe: str, tmp_path: Path) -> None:
    config = ROOT / "experiments" / "gpu" / f"{recipe}.yaml"
    assert config.read_text().startswith(f"# python -m midus fit --config experiments/gpu/{recipe}.yaml\n")
    base = llama3_standin(tmp_path / "base", layers=RECIPES[recipe])
    shards = write_parquet_shards(tmp_path / "text", STANDIN_TEXT * 3)
    overrides = twin_overrides(tmp_path, base, shards)
    command = parse_command_line(["fit", "--config", str(config), *overrides])
    plans = {arm: plan_arm(command, arm) for arm in command.ablation.arms}  # every arm is a valid run
    assert {arm for arm in plans if arm.endswith("_frozen")} == {"dus_interleave_frozen", "midus_hml_hive_frozen"}
    for arm, plan in plans.items():
        recipe_settings = plan.config["model"]
        assert recipe_settings["compute"]["activation_checkpointing"]
        assert plan.config["trainer"]["precision"] == "bf16-mixed"
        assert plan.config["data"]["format"] == "shards" and plan.config["data"]["tokenizer"] == "auto"

    arm = "midus_hml_hive_frozen"
    arm_config = tmp_path / f"{arm}.yaml"
    arm_config.write_text(yaml.safe_dump(plans[arm].config, sort_keys=False))
    cli = main(command.for_arm(str(arm_config)))
    module, data = cli.trainer.lightning_module, cli.datamodule
    # The base's tokenizer (BOS first) from data.tokenizer: auto, token shards, a memory block inserted.
    assert data.tokenizer.bos_token == BOS and data.tokenizer("a b")["input_ids"][0] == data.tokenizer.bos_token_id
    assert any(type(block).__name__ == "MemoryBlock" for block in module.model.blocks)
    assert module.added_parameters > 0
    assert module.model.num_parameters(trainable_only=True) < module.model.num_parameters()  # frozen base
    assert cli.trainer.global_step == 3 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    run = tmp_path / "runs" / recipe / arm
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["accumulate_grad_batches"] == 2
    stored = read_kit_checkpoint(run / "checkpoints" / "last.ckpt")
    assert stored["hyper_parameters"]["compute"]["activation_checkpointing"] is True


def recipe_estimates(recipe: str) -> dict[str, tuple[int, int, float]]:
    """arm -> (parameters, trainable, estimated GiB) of the recipe on its real base's shape, built on the
    meta device (no memory), with the recipe's own batch, precision, checkpointing and loss chunks."""
    import torch

    from midus.model import MidusLM, ModelConfig
    from midus.training.memory_estimate import estimate_training_memory
    from midus.upscale import UpscaleConfig, apply_trainable, upscale

    document = yaml.safe_load((ROOT / "experiments" / "gpu" / f"{recipe}.yaml").read_text())
    model_settings, data = document["model"], document["data"]
    section = {key: model_settings["upscale"][key] for key in ("method", "every", "branch", "memory", "trainable")}
    estimates = {}
    with torch.device("meta"):
        base = MidusLM(ModelConfig(**SHAPES[recipe][0]))
        for arm, overrides in document["ablation"]["arms"].items():
            settings = UpscaleConfig(**{**section, **{key.split(".")[-1]: value for key, value in overrides.items()}})
            model, inserted = upscale(base, settings)
            apply_trainable(model, inserted, settings.trainable)
            trainable = model.num_parameters(trainable_only=True)
            estimate = estimate_training_memory(
                model.config, trainable, data["batch_size"], data["block_size"], document["trainer"]["precision"],
                model_settings["compute"]["activation_checkpointing"], model_settings["compute"]["loss_chunk_tokens"],
                total_parameters=model.num_parameters(),
            )
            estimates[arm] = (model.num_parameters(), trainable, estimate.total / 2**30)
    return estimates


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_arm_of_the_recipe_fits_its_card_by_the_kits_estimate(recipe: str) -> None:
    estimates = recipe_estimates(recipe)
    card = SHAPES[recipe][1]
    assert all(gib < card for _, _, gib in estimates.values()), estimates
    # Frozen arms train only the inserted blocks; MIDUS adds fewer parameters than interleaved DUS.
    trainable = {arm: estimate[1] for arm, estimate in estimates.items()}
    assert trainable["midus_hml_hive_frozen"] < trainable["dus_interleave_frozen"] < trainable["dus_interleave"]
    assert estimates["base_continued"][0] < estimates["midus_hml_hive"][0] < estimates["dus_interleave"][0]


def test_gpu_check_runs_every_section_at_toy_size_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", "--dtype", "float32",
         "--steps", "1", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    for arm in ("base", "dus_interleave", "midus_hml_hive"):
        assert f"| train | {arm} | step ms |" in table and f"| train | {arm} | peak GiB / estimate GiB |" in table
    assert "| syncs | memory block | per training step | n/a | CUDA only |" in table
    assert "| cost | hml-hive | train / transformer |" in table
    assert "| lookup | weighted rows | forward+backward TB/s |" in table
