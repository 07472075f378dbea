"""A kit checkpoint stands alone: ``validate``/``test``/``predict`` and resume (``fit --ckpt_path``)
build the model from the architecture the checkpoint stores, so an up-scaled or imported model
needs its base no longer; ``--model.*`` values given with ``--ckpt_path`` are kept or refused,
never silently replaced; ``fit`` refuses ``trainer.precision: bf16-true``.

Every run is a real ``python -m midus`` call on a tiny model and a tiny text file (`write_corpus`),
whose configuration `write_config` writes: the shrunk quickstart of tests/test_cli.py with a
``files`` source, which has no recall probe, and a checkpoint after every step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from midus.checkpoint.kit import SOURCE_KEY, frozen_parameter_names, read_kit_checkpoint
from midus.cli import main
from midus.model import MidusLM, ModelConfig
from tests.hf_standins import STANDIN_TEXT, llama3_standin

MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8}


def write_corpus(directory: Path) -> Path:
    """The stand-in text, one record per line (180 short documents)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "train.txt"
    path.write_text("\n".join(STANDIN_TEXT) + "\n")
    return path


def write_config(path: Path, corpus: Path, cache: Path, steps: int = 6) -> Path:
    """A tiny run's YAML: 2 blocks of width 32, validation every 3 steps, ``step-S.ckpt`` every step.
    It sets no ``data.tokenizer``: the default (auto) decides."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": steps, "val_check_interval": 3, "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "accelerator": "cpu",
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "tiny", "version": "run", "default_hp_metric": False},
            },
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"save_last": True, "enable_version_counter": False}},
                {"class_path": "midus.training.checkpoints.PeriodicCheckpoint",
                 "init_args": {"every_n_train_steps": 1, "keep": -1}},
            ],
        },
        "model": {
            "config": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
            "optimizer": {"learning_rate": 0.01}, "schedule": {"warmup_steps": 2},
        },
        "data": {
            "source": "files", "files": {"train": [str(corpus)], "sample_by": "line", "val_fraction": 0.1},
            "bpe_vocab_size": 300, "block_size": 32, "batch_size": 8, "cache_dir": str(cache),
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(command: str, config: Path, save_dir: Path, *extra: str):
    """``python -m midus <command> --config <config>`` logging under `save_dir`; returns the MidusCLI."""
    return main([command, "--config", str(config), "--trainer.logger.init_args.save_dir", str(save_dir), *extra])


def run_dir(save_dir: Path) -> Path:
    return save_dir / "tiny" / "run"


def scalars(save_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir(save_dir)))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def error_line(capsys: pytest.CaptureFixture) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()
            if not parameter.requires_grad}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> tuple[Path, Path]:
    """(config, last.ckpt) of a 3-step from-scratch run with its own BPE: the base to up-scale."""
    root = tmp_path_factory.mktemp("standalone_base")
    config = write_config(root / "tiny.yaml", write_corpus(root), tiny_cache, steps=3)
    run("fit", config, root / "runs")
    return config, run_dir(root / "runs") / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_an_upscaled_checkpoint_validates_and_resumes_without_its_base(
    base_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, base_last = base_run
    base = tmp_path / "base" / "base.ckpt"  # a copy this test deletes
    base.parent.mkdir()
    shutil.copy(base_last, base)
    memory = [arg for key, value in MEMORY.items() for arg in (f"--model.upscale.memory.{key}", str(value))]
    upscale = [
        "--trainer.max_steps", "6",  # the base ran 3
        "--model.upscale.base_checkpoint", str(base), "--model.upscale.method", "midus",
        "--model.upscale.every", "1", "--model.upscale.trainable", "new", *memory,
    ]
    whole = run("fit", config, tmp_path / "whole", *upscale)
    trained = whole.model
    assert trained.base_parameters > 0 and trained.added_parameters > 0
    frozen_at_end = frozen(trained.model)
    assert frozen_at_end and len(frozen_at_end) < len(list(trained.model.parameters()))  # trainable: new
    checkpoints = run_dir(tmp_path / "whole") / "checkpoints"
    source = read_kit_checkpoint(checkpoints / "last.ckpt")[SOURCE_KEY]
    assert sorted(source["frozen_parameters"]) == sorted(frozen_at_end)
    assert source["base_parameters"] == trained.base_parameters
    losses, val_losses = scalars(tmp_path / "whole", "train/loss"), scalars(tmp_path / "whole", "val/loss")
    assert sorted(losses) == list(range(6)) and sorted(val_losses) == [2, 5]

    base.unlink()

    # validate and test: the checkpoint's model, its val/loss as the run logged it after its last step.
    validated = run("validate", config, tmp_path / "evaluate", *upscale, "--ckpt_path", str(checkpoints / "last.ckpt"))
    assert validated.trainer.callback_metrics["val/loss"].item() == pytest.approx(val_losses[5], rel=1e-6)
    # The run's own config.yaml (the documented way to evaluate a run) names the base too.
    tested = run("test", run_dir(tmp_path / "whole") / "config.yaml", tmp_path / "evaluate",
                 "--ckpt_path", str(checkpoints / "last.ckpt"))
    assert tested.trainer.callback_metrics["test/loss"].item() == pytest.approx(val_losses[5], rel=1e-6)
    predicted = run("predict", config, tmp_path / "evaluate", *upscale, "--ckpt_path", str(checkpoints / "last.ckpt"),
                    "--data.predict_prompts", "[the cat of Oslo]", "--model.generation.max_new_tokens", "3")
    predictions = run_dir(tmp_path / "evaluate") / "predictions.jsonl"
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [record["prompt"] for record in records] == ["the cat of Oslo"]
    assert predicted.model.hparams.generation["max_new_tokens"] == 3

    # Resumed after step 3: every later step's loss is the uninterrupted run's, bit for bit (the same
    # parameters train in the same optimizer groups), and the frozen blocks are still the base's.
    resumed = run("fit", config, tmp_path / "resumed", *upscale, "--ckpt_path", str(checkpoints / "step-3.ckpt"))
    resumed_losses = scalars(tmp_path / "resumed", "train/loss")
    assert sorted(resumed_losses) == [3, 4, 5]
    assert resumed_losses == {step: losses[step] for step in (3, 4, 5)}
    assert scalars(tmp_path / "resumed", "val/loss")[5] == val_losses[5]
    module = resumed.model
    groups = [
        [(group["name"], [tuple(parameter.shape) for parameter in group["params"]])
         for group in cli.trainer.optimizers[0].param_groups]
        for cli in (whole, resumed)
    ]
    assert groups[0] == groups[1]
    still_frozen = frozen(module.model)
    assert still_frozen.keys() == frozen_at_end.keys()
    assert all(torch.equal(still_frozen[name], frozen_at_end[name]) for name in frozen_at_end)
    assert (module.base_parameters, module.added_parameters) == (trained.base_parameters, trained.added_parameters)
    # The resumed run's config.yaml still describes the up-scaling (ablation tables read it).
    saved = yaml.safe_load((run_dir(tmp_path / "resumed") / "config.yaml").read_text())
    assert saved["model"]["upscale"]["method"] == "midus" and saved["model"]["upscale"]["trainable"] == "new"
    assert saved["model"]["upscale"]["base_checkpoint"] == str(base)
    assert saved["data"]["tokenizer"] == "auto"  # resolved again by each run, from its checkpoint here


@pytest.mark.slow
def test_a_pretrained_checkpoint_validates_and_resumes_without_its_directory(
    tmp_path: Path, tiny_cache: Path
) -> None:
    standin = llama3_standin(tmp_path / "llama")
    config = write_config(tmp_path / "tiny.yaml", write_corpus(tmp_path), tiny_cache)
    pretrained = ["--model.pretrained", str(standin)]
    run("fit", config, tmp_path / "whole", *pretrained)
    losses, val_losses = scalars(tmp_path / "whole", "train/loss"), scalars(tmp_path / "whole", "val/loss")
    checkpoints = run_dir(tmp_path / "whole") / "checkpoints"

    shutil.rmtree(standin)
    last = str(checkpoints / "last.ckpt")
    validated = run("validate", config, tmp_path / "evaluate", *pretrained, "--ckpt_path", last)
    assert validated.trainer.callback_metrics["val/loss"].item() == pytest.approx(val_losses[5], rel=1e-6)
    run("fit", config, tmp_path / "resumed", *pretrained, "--ckpt_path", str(checkpoints / "step-3.ckpt"))
    assert scalars(tmp_path / "resumed", "train/loss") == {step: losses[step] for step in (3, 4, 5)}


@pytest.mark.slow
def test_model_values_given_with_ckpt_path_are_kept(base_run: tuple[Path, Path], tmp_path: Path) -> None:
    config, last = base_run
    stored = read_kit_checkpoint(last)["hyper_parameters"]
    assert (stored["generation"]["max_new_tokens"], stored["optimizer"]["learning_rate"]) == (32, 0.01)
    cli = run(
        "validate", config, tmp_path / "runs", "--ckpt_path", str(last),
        "--model.generation.max_new_tokens", "7", "--model.optimizer.learning_rate", "0.5",
    )
    hparams = cli.model.hparams
    assert (hparams.generation["max_new_tokens"], hparams.optimizer["learning_rate"]) == (7, 0.5)
    assert hparams.schedule["warmup_steps"] == 2  # not given: the checkpoint's


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--model.config.d_model", "64"], "model.config.d_model=64"),
        (["--model.upscale.trainable", "new"], "model.upscale.trainable='new'"),
    ],
    ids=["config", "upscale"],
)
def test_an_architecture_value_other_than_the_checkpoints_is_refused(
    base_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], field: str
) -> None:
    config, last = base_run
    with pytest.raises(SystemExit) as failure:
        run("validate", config, tmp_path / "runs", "--ckpt_path", str(last), *flags)
    assert failure.value.code == 2
    error = error_line(capsys)
    assert error.startswith(f"error: {field} was given, but --ckpt_path {str(last)!r} holds a model made with")
    assert "the architecture (model.config, model.pretrained, model.upscale) comes from the checkpoint" in error
    assert not (tmp_path / "runs").exists()


def test_frozen_parameter_names_are_the_bare_models() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = MidusLM(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2))
    model.blocks[0].requires_grad_(False)
    model.norm.requires_grad_(False)
    bare = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    assert bare and all(name.startswith(("blocks.0.", "norm.")) for name in bare)
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])  # as activation checkpointing wraps a block
    compiled = torch.compile(model)  # an OptimizedModule: "_orig_mod." before every name
    assert frozen_parameter_names(compiled) == bare


@pytest.mark.slow
def test_fit_refuses_bf16_true_and_evaluation_keeps_it(
    base_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config, last = base_run
    with pytest.raises(SystemExit) as failure:
        run("fit", config, tmp_path / "runs", "--trainer.precision", "bf16-true")
    assert failure.value.code == 2
    error = error_line(capsys)
    assert error.startswith("error: trainer.precision=bf16-true") and "trainer.precision: bf16-mixed" in error
    assert not (tmp_path / "runs").exists()
    validated = run("validate", config, tmp_path / "runs", "--ckpt_path", str(last), "--trainer.precision", "bf16-true")
    assert validated.trainer.precision == "bf16-true"
    assert torch.isfinite(validated.trainer.callback_metrics["val/loss"])
