"""Keys that moved (`midus.moved_keys`): given by a user, each is one ``error:`` line naming
its new place before anything is written (a flag, a ``--config`` YAML, an ablation's overrides, the
analyses' and ``prepare``'s flags); written by the kit before the move (a checkpoint's hyperparameters,
an ablation arm's record, a run's ``config.yaml``), each is read at its new place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from midus.ablation.resume import RESUME, SKIP, plan_start
from midus.analysis.checkpoint_run import data_section
from midus.cli import USER_ERROR_EXIT, main
from midus.moved_keys import MOVED_DATA_KEYS, MOVED_KEYS, MOVED_MODEL_KEYS, SOURCE, upgrade_config
from midus.run_files import ARM_COMMAND, ARM_CONFIG, CHECKPOINT_DIR, SUMMARY_FILE
from midus.training.cli import parse_only
from tests.test_ablation import write_ablation
from tests.test_checkpoint_safety import tiny_run
from tests.test_user_errors import one_error_line


def stopped(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """The error line of a ``python -m midus`` command that must stop with a user error."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == USER_ERROR_EXIT
    return one_error_line(capsys)


def test_every_new_place_is_a_key_of_the_fit_parser_and_no_old_place_is() -> None:
    defaults = parse_only(["fit"])
    for old, new in MOVED_KEYS.items():
        for place in [new.replace(SOURCE, source) for source in ("files", "hub")] if SOURCE in new else [new]:
            assert place in defaults, f"{old} moved to {place}, which fit does not know"
        assert old not in defaults, f"{old} is still a key of fit"


def test_a_moved_flag_is_one_error_line_and_nothing_is_written(tmp_path: Path, capsys, tiny_cache: Path) -> None:
    error = stopped(["fit", *tiny_run(tmp_path, tiny_cache), "--model.learning_rate=0.1"], capsys)
    assert error == "error: --model.learning_rate moved: it is --model.optimizer.learning_rate now"
    error = stopped(["fit", *tiny_run(tmp_path, tiny_cache), "--data.val_fraction", "0.1"], capsys)
    assert error == ("error: --data.val_fraction moved: it is --data.files.val_fraction or --data.hub.val_fraction "
                     "(the group of data.source) now")
    assert not (tmp_path / "runs").exists()


def test_a_moved_key_in_a_config_yaml_is_one_error_line_naming_every_moved_key(tmp_path: Path, capsys) -> None:
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"default_root_dir": str(tmp_path / "run")},
        "model": {"memory_lr": 0.1, "compile": False}, "data": {"source": "hub", "hub_dataset": "x"},
    }, sort_keys=False))
    error = stopped(["fit", "--config", str(config)], capsys)
    assert error == (
        f"error: {config}: model.memory_lr moved: it is model.memory_optimizer.learning_rate now; also moved: "
        "model.compile -> model.compute.compile, data.hub_dataset -> data.hub.dataset"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["arm", "nested arm", "tune candidate", "tune keep"])
def test_a_moved_key_in_an_ablations_overrides_is_one_error_line(tmp_path: Path, capsys, where: str) -> None:
    arms = {"a": {}, "b": {"model.optimizer.learning_rate": 0.01}}
    tune = {"candidates": {"slow": {"model.optimizer.learning_rate": 0.001},
                           "fast": {"model.optimizer.learning_rate": 0.01}}}
    if where == "arm":
        arms["b"] = {"model.warmup_steps": 5}
    elif where == "nested arm":
        arms["b"] = {"model": {"warmup_steps": 5}}
    elif where == "tune candidate":
        tune["candidates"]["slow"] = {"model.warmup_steps": 5}
    else:
        tune["keep"] = {"b": ["model.warmup_steps"]}
    path = write_ablation(tmp_path, arms)
    document = yaml.safe_load(path.read_text())
    document["ablation"]["tune"] = tune
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    error = stopped(["fit", "--config", str(path), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")],
                    capsys)
    inside = {"arm": "ablation.arms.b", "nested arm": "ablation.arms.b",
              "tune candidate": "ablation.tune.candidates.slow", "tune keep": "ablation.tune.keep.b"}[where]
    assert error == f"error: {path}: model.warmup_steps (in {inside}) moved: it is model.schedule.warmup_steps now"
    assert not (tmp_path / "runs").exists()


def test_the_analyses_and_prepare_name_a_moved_data_flag(tmp_path: Path, capsys) -> None:
    error = stopped(["memory-usage", "--ckpt_path", str(tmp_path / "x.ckpt"), "--data.train_files", "[a.txt]"], capsys)
    assert error == "error: --data.train_files moved: it is --data.files.train now"
    error = stopped(["prepare", "--data.max_tokens", "10"], capsys)
    assert error == "error: --data.max_tokens moved: it is --data.shards.max_tokens now"


def test_an_old_data_section_is_read_at_its_new_places() -> None:
    old = {"source": "files", "train_files": ["a.txt"], "val_fraction": 0.2, "text_field": "body", "seed": 3,
           "hub_dataset": "", "max_tokens": 0, "block_size": 64}
    assert upgrade_config(old, MOVED_DATA_KEYS, "data.") == {
        "source": "files", "files": {"train": ["a.txt"], "val_fraction": 0.2, "text_field": "body", "seed": 3},
        "hub": {"dataset": ""}, "shards": {"max_tokens": 0}, "block_size": 64,
    }
    hub = upgrade_config({"source": "hub", "val_fraction": 0.1}, MOVED_DATA_KEYS, "data.")
    assert hub == {"source": "hub", "hub": {"val_fraction": 0.1}}
    # The embedded corpus never read them: they are dropped, not guessed into a group.
    assert upgrade_config({"source": "embedded", "seed": 0, "text_field": "text"}, MOVED_DATA_KEYS, "data.") == {
        "source": "embedded"}


def test_an_analysis_of_a_run_from_before_the_move_reads_its_data_section(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "exp" / "arm"
    (run / CHECKPOINT_DIR).mkdir(parents=True)
    saved = {"model": {"learning_rate": 0.003}, "data": {"source": "files", "train_files": ["a.txt"],
                                                          "text_sample_by": "line", "prepared_dir": ""}}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    section = data_section(run / CHECKPOINT_DIR / "last.ckpt", None, None)
    assert section == {"source": "files", "files": {"train": ["a.txt"], "sample_by": "line"},
                       "shards": {"directory": ""}}


def flat_hparams(hparams: dict) -> dict:
    """A checkpoint's hyperparameters as the kit saved them before issue 28 (every knob at the top)."""
    flat = {key: value for key, value in hparams.items() if key in ("config", "pretrained", "upscale", "probes")}
    for old, new in MOVED_MODEL_KEYS.items():
        _, group, field = new.split(".")
        if group != "probes":
            flat[old.removeprefix("model.")] = hparams[group][field]
    return flat


@pytest.mark.slow
def test_a_checkpoint_with_flat_hyperparameters_validates_and_resumes(tmp_path: Path, tiny_cache: Path) -> None:
    run = [*tiny_run(tmp_path, tiny_cache), "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2"]
    # Values the quickstart YAML leaves alone, so the checkpoint's stand (a given one is put back over it).
    main(["fit", *run, "--trainer.max_steps", "2", "--model.optimizer.weight_decay", "0.05",
          "--model.generation.max_new_tokens", "9"])
    (written,) = (tmp_path / "runs").glob("*/*/checkpoints/last.ckpt")
    checkpoint = torch.load(written, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"] = flat_hparams(checkpoint["hyper_parameters"])
    assert checkpoint["hyper_parameters"]["weight_decay"] == 0.05 and "optimizer" not in checkpoint["hyper_parameters"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    validated = main(["validate", *run, "--ckpt_path", str(old)])
    # The checkpoint's values, at their new places.
    module = validated.model
    assert (module.optimizer_config.weight_decay, module.generation_config.max_new_tokens) == (0.05, 9)
    resumed = main(["fit", *run, "--trainer.max_steps", "3", "--ckpt_path", str(old)])
    assert resumed.trainer.global_step == 3 and resumed.model.optimizer_config.weight_decay == 0.05


def old_arm_record(run_dir: Path, command: list[str], finished: bool) -> dict:
    """An ablation arm's run directory as the runner left it before issue 28; the config as it is now."""
    now = {"model": {"optimizer": {"learning_rate": 0.01}, "schedule": {"warmup_steps": 5}},
           "data": {"source": "embedded", "embedded": {"seed": 1}}}
    before = {"model": {"learning_rate": 0.01, "warmup_steps": 5},
              "data": {"source": "embedded", "embedded": {"seed": 1}, "seed": 0}}
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True)
    (run_dir / ARM_CONFIG).write_text("# Arm 'b' of x.yaml.\n" + yaml.safe_dump(before))
    (run_dir / ARM_COMMAND).write_text(yaml.safe_dump({"args": command}))
    torch.save({"global_step": 4}, run_dir / CHECKPOINT_DIR / "last.ckpt")
    if finished:
        (run_dir / SUMMARY_FILE).write_text(json.dumps({"config_paths": [str(run_dir / ARM_CONFIG)]}))
    return now


@pytest.mark.parametrize("finished", [True, False])
def test_an_ablation_arm_started_before_the_move_is_skipped_or_resumed(tmp_path: Path, finished: bool) -> None:
    run_dir = tmp_path / "runs" / "x" / "b"
    command = ["fit", "--config", str(run_dir / ARM_CONFIG)]
    now = old_arm_record(run_dir, command, finished)
    start = plan_start(run_dir, now, command, fresh=False)
    assert start.action == (SKIP if finished else RESUME)
    start.prepare("# header\n", now, command)
    recorded = yaml.safe_load((run_dir / ARM_CONFIG).read_text())
    # A resumed arm's fit reads its arm_config.yaml again: the keys are rewritten at their new places.
    assert recorded == (now if not finished else {"model": {"learning_rate": 0.01, "warmup_steps": 5},
                                                   "data": {"source": "embedded", "embedded": {"seed": 1}, "seed": 0}})
    assert (run_dir / ARM_CONFIG).read_text().startswith("# Arm 'b' of x.yaml.\n")
