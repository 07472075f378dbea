"""`python -m midus` end to end: fit writes TensorBoard events and a checkpoint that validate loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from midus.ablation.config import load_ablation
from midus.cli import main
from midus.data.datamodule import LanguageModelingData
from midus.training import CausalLM
from midus.training.cli import MidusCLI

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def tiny_overrides(tmp_path: Path, cache: Path) -> list[str]:
    """Shrink the quickstart to seconds: tiny corpus, model and schedule, logs under tmp_path."""
    return [
        "--config", str(ROOT / "experiments" / "quickstart.yaml"),
        "--trainer.max_steps", "12",
        "--trainer.val_check_interval", "6",
        "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.config.d_model", "32",
        "--model.config.n_layers", "2",
        "--model.probes.recall_questions", "20",
        "--data.embedded.num_people", "20",
        "--data.embedded.docs_per_person", "3",
        "--data.bpe_vocab_size", "300",
        "--data.block_size", "32",
        "--data.batch_size", "8",
        "--data.cache_dir", str(cache),
    ]


@pytest.mark.slow
def test_fit_logs_metrics_and_writes_a_checkpoint_that_validate_loads(tmp_path: Path, tiny_cache: Path) -> None:
    main(["fit", *tiny_overrides(tmp_path, tiny_cache)])
    run = tmp_path / "runs" / "quickstart" / "ffn"
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/tokens_per_sec", "val/loss", "val/ppl", "val/recall_acc",
                "val/recall_acc_heldout"}
    assert expected <= tags, expected - tags
    # The full sanity pass is logged as the untrained step-0 point.
    assert events.Scalars("val/loss")[0].step == 0
    assert (run / "config.yaml").is_file() and "vocab_size" in (run / "hparams.yaml").read_text()
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    # last.ckpt holds the final weights whether or not the last validation improved val/loss.
    import torch

    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 12
    assert list((run / "checkpoints").glob("best-step=*.ckpt"))

    cli = main(["validate", *tiny_overrides(tmp_path, tiny_cache), "--ckpt_path", str(last)])
    validated = cli.trainer.callback_metrics["val/loss"].item()
    final_logged = events.Scalars("val/loss")[-1].value  # last.ckpt was saved after the last validation
    assert validated == pytest.approx(final_logged, rel=1e-4)

    tested = main(["test", *tiny_overrides(tmp_path, tiny_cache), "--ckpt_path", str(last)])
    assert tested.trainer.callback_metrics["test/loss"].item() == pytest.approx(validated, rel=1e-4)

    main(["predict", *tiny_overrides(tmp_path, tiny_cache), "--ckpt_path", str(last),
          "--data.predict_prompts", "[Hello there, Once upon]", "--model.generation.max_new_tokens", "5"])
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Hello there", "Once upon"]
    # Each completion is the checkpoint's greedy continuation (temperature 0) after end-of-text +
    # the prompt, decoded: recomputed from last.ckpt and its stored tokenizer. Its length is the
    # --model.generation.max_new_tokens given above, not the checkpoint's (a given flag is honoured).
    from midus.checkpoint.kit import checkpoint_tokenizer, model_from_checkpoint, read_kit_checkpoint

    stored = read_kit_checkpoint(last)
    model, tokenizer = model_from_checkpoint(stored, last).eval(), checkpoint_tokenizer(stored)
    new_tokens = 5
    assert stored["hyper_parameters"]["generation"]["max_new_tokens"] != new_tokens
    for record in records:
        prompt_ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        prompt = torch.tensor([[tokenizer.eos_token_id, *prompt_ids]])
        greedy = model.generate(prompt, new_tokens)[0, prompt.shape[1]:]
        assert record["completion"] == tokenizer.decode(greedy, skip_special_tokens=True)


def experiment_param(path: Path):
    """An ablation YAML builds a model per arm (seconds each, the up-scaling ones more): slow."""
    try:
        slow = load_ablation(path) is not None
    except Exception:  # noqa: BLE001 -- a broken YAML fails in the test itself, not at collection
        slow = False
    return pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("path", [experiment_param(path) for path in EXPERIMENTS])
def test_every_experiment_yaml_parses_and_instantiates(path: Path, tiny_cache: Path, tmp_path: Path, tiny_data) -> None:
    assert path.read_text().startswith("# python -m midus ")
    overrides = ["--data.cache_dir", str(tiny_cache)]
    # Up-scaling configs read a base that pretrain_base.yaml writes: stand in a tiny one and its tokenizer.
    base = tiny_base(tmp_path, tiny_data) if "base_checkpoint:" in path.read_text() else []
    ablation = load_ablation(path)
    configs = {path.stem: path}
    if ablation is not None:  # an arm's merged config is a plain single-run config
        # Every arm's model is parsed and built in test_experiment_arms; here each distinct data and
        # trainer setup goes through the CLI once (instantiation, the vocabulary link).
        configs, setups = {}, set()
        for arm in ablation.arms:
            merged = ablation.arm_config(arm)
            trainer = {key: value for key, value in (merged.get("trainer") or {}).items() if key != "logger"}
            setup = yaml.safe_dump({"data": merged.get("data"), "trainer": trainer}, sort_keys=True)
            upscale = (merged.get("model") or {}).get("upscale") or {}
            # How the model is made; head_importance allocation reads the linked data too.
            setup += f"{upscale.get('method')} {upscale.get('memory_allocation')}"
            if setup in setups:
                continue
            setups.add(setup)
            configs[arm] = tmp_path / f"{arm}.yaml"
            configs[arm].write_text(yaml.safe_dump(merged, sort_keys=False))
    for name, config in configs.items():
        upscaled = "base_checkpoint:" in config.read_text()  # memory_health mixes from-scratch and inserted arms
        cli = MidusCLI(
            CausalLM, LanguageModelingData, run=False, auto_configure_optimizers=False,
            args=["--config", str(config), *overrides, *(base if upscaled else [])],
        )
        assert cli.model.model.config.vocab_size == cli.datamodule.vocab_size, name  # linked, never typed twice


def tiny_base(tmp_path: Path, data) -> list[str]:
    """A kit checkpoint of a tiny random model and the tokenizer it uses, as CLI overrides."""
    import dataclasses

    import torch

    from midus.checkpoint.kit import MODEL_CONFIG_KEY
    from midus.model import MidusLM, ModelConfig

    config = ModelConfig(vocab_size=data.vocab_size, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2)
    state = {f"model.{name}": value for name, value in MidusLM(config).state_dict().items()}
    torch.save({MODEL_CONFIG_KEY: dataclasses.asdict(config), "state_dict": state}, tmp_path / "base.ckpt")
    data.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    return [
        "--model.upscale.base_checkpoint", str(tmp_path / "base.ckpt"),
        "--data.tokenizer_path", str(tmp_path / "tokenizer"),
    ]


def test_bad_model_config_fails_before_anything_is_written(tmp_path: Path, tiny_cache: Path) -> None:
    with pytest.raises((SystemExit, ValueError)) as failure:
        main(["fit", *tiny_overrides(tmp_path, tiny_cache), "--model.config.n_heads", "5"])
    message = (
        str(failure.value.__context__ or failure.value) if isinstance(failure.value, SystemExit) else str(failure.value)
    )
    assert "n_heads=5 must divide d_model=32" in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_help_and_print_config(capsys) -> None:
    # --help in a fresh process: the field docstrings are parsed there (the suite turns that off).
    help_text = subprocess.run(
        [sys.executable, "-m", "midus", "fit", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "--model.config.n_kv_heads" in help_text and "Key/value heads for grouped-query attention" in help_text
    with pytest.raises(SystemExit) as printing:  # jsonargparse exits 0 after printing
        main(["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert printing.value.code in (0, None)
    assert "branch: ffn" in printed and "bpe_vocab_size: 1024" in printed
