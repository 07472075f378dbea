"""midus.ablation.results: TensorBoard's own hparams plugin lists every run of an ablation it wrote."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from midus.ablation.config import deep_merge
from midus.ablation.results import HPARAMS_EVENTS_GLOB, hparams_of_arm, metrics_of_record, write_hparams

BASE = {
    "seed_everything": 0,
    "trainer": {"max_steps": 400, "val_check_interval": 100},
    "model": {
        "optimizer": {"learning_rate": 0.003},
        "memory_optimizer": {"learning_rate": 0.03},
        "schedule": {"warmup_steps": 50},
        "config": {"d_model": 128, "n_layers": 4, "memory_layers": [1, 3],
                   "memory": {"n_subkeys": 64, "topk": 32, "values": "hive", "latent_dim": 32}},
    },
    "data": {"source": "embedded", "embedded": {"seed": 0, "num_people": 200}},
}
# The arms override different fields: the table needs the union of both key sets.
ARMS = {
    "hive": {"model": {"schedule": {"warmup_steps": 10}, "config": {"memory": {"values": "hive"}}}},
    "wide": {"model": {"config": {"d_model": 256, "memory": {"query_norm": "rmsnorm", "zero_init_values": False}}}},
}
SEEDS = (0, 1)


def record_of(arm: str, seed: int) -> dict:
    """A summary.json-shaped record whose numbers differ per run."""
    loss = 3.0 + 0.25 * list(ARMS).index(arm) + 0.125 * seed
    return {
        "val": {"loss": loss, "ppl": math.exp(loss), "best_loss": loss - 0.0625, "recall_acc": 0.5 + 0.01 * seed,
                "recall_acc_heldout": None, "recall_acc_replay": 0.75},
        "memory_zeroed_delta": None,
        "train": {"steps": 400, "mean_step_time_s": 0.39},
        "latency": {"prompt_tokens": 128, "decode_ms_per_token": 1.9},
    }


def read_plugin(logdir: Path, request: dict | None = None) -> tuple[list[str], object, dict[str, object]]:
    """(active plugins, experiment, {session name: session group}) as TensorBoard serves `logdir`."""
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.context import RequestContext
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = MultiplexerDataProvider(multiplexer, str(logdir))
    context = backend_context.Context(base_plugin.TBContext(data_provider=provider, logdir=str(logdir),
                                                            multiplexer=multiplexer))
    request_context = RequestContext()
    experiment = get_experiment.Handler(request_context, context, "", api_pb2.GetExperimentRequest()).run()
    groups_request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, allowed_statuses=[api_pb2.STATUS_SUCCESS, api_pb2.STATUS_UNKNOWN],
        **(request or {}))
    groups = list_session_groups.Handler(request_context, context, "", groups_request).run()
    plugins = list(provider.list_plugins(request_context, experiment_id=""))
    return plugins, experiment, {group.name: group for group in groups.session_groups}


def as_written(value: float) -> float:
    """`value` as a TensorBoard scalar holds it: float32, as Lightning's own scalars."""
    return float(np.float32(value))


def hparams_of(group: object) -> dict:
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in group.hparams.items()}


def metrics_of(group: object) -> dict[str, float]:
    (session,) = group.sessions
    return {value.name.tag: value.value for value in session.metric_values}


@pytest.fixture
def experiment_dir(tmp_path: Path) -> Path:
    """runs/<exp>/<arm>/seed<k>/ with a Lightning-like events file (val/loss) and one hparams file each."""
    from torch.utils.tensorboard import SummaryWriter

    for arm, overrides in ARMS.items():
        for seed in SEEDS:
            run_dir = tmp_path / "exp" / arm / f"seed{seed}"
            record = record_of(arm, seed)
            with SummaryWriter(log_dir=str(run_dir)) as lightning:
                lightning.add_scalar("val/loss", record["val"]["loss"], 400)
            config = deep_merge(BASE, {**overrides, "seed_everything": seed})
            write_hparams(run_dir, hparams_of_arm(arm, seed, overrides, config), metrics_of_record(record), 400)
    return tmp_path / "exp"


def test_plugin_lists_every_run_with_its_hparams_and_metrics(experiment_dir: Path) -> None:
    plugins, experiment, groups = read_plugin(experiment_dir)
    assert "hparams" in plugins  # the dashboard is enabled
    assert sorted(groups) == ["hive/seed0", "hive/seed1", "wide/seed0", "wide/seed1"]
    columns = {info.name for info in experiment.hparam_infos}
    # Both arms' overridden fields are columns, though each run has only its own.
    assert {"arm", "seed", "model.schedule.warmup_steps", "model.config.memory.query_norm",
            "model.config.memory.zero_init_values", "model.config.d_model", "trainer.max_steps"} <= columns
    assert {(info.name.tag, info.name.group) for info in experiment.metric_infos} >= {
        ("hparams/val_ppl", ""), ("hparams/val_best_ppl", ""), ("val/loss", "")}
    for arm, overrides in ARMS.items():
        for seed in SEEDS:
            group, record = groups[f"{arm}/seed{seed}"], record_of(arm, seed)
            hparams = hparams_of(group)
            assert hparams["arm"] == arm and hparams["seed"] == seed
            assert hparams["model.config.d_model"] == (256 if arm == "wide" else 128)
            assert ("model.schedule.warmup_steps" in hparams) == (arm == "hive")
            if arm == "wide":
                assert hparams["model.config.memory.zero_init_values"] is False
                assert hparams["model.config.memory.query_norm"] == "rmsnorm"
            metrics = metrics_of(group)
            assert metrics["hparams/val_loss"] == as_written(record["val"]["loss"])
            assert metrics["hparams/val_best_ppl"] == as_written(math.exp(record["val"]["best_loss"]))
            assert metrics["hparams/recall_acc"] == as_written(record["val"]["recall_acc"])
            assert metrics["hparams/step_time_ms"] == as_written(390.0)
            assert metrics["val/loss"] == as_written(record["val"]["loss"])  # Lightning's, same folder
            assert "hparams/recall_acc_heldout" not in metrics


def test_scalars_are_float32(experiment_dir: Path) -> None:
    """TensorBoard's default loader (the Rust data server, not the one read above) drops float64 scalars."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto import types_pb2

    (path,) = (experiment_dir / "wide" / "seed1").glob(HPARAMS_EVENTS_GLOB)
    scalars = [value for event in EventFileLoader(str(path)).Load() for value in event.summary.value
               if not value.tag.startswith("_hparams_/")]
    assert len(scalars) == len(metrics_of_record(record_of("wide", 1))) > 0
    assert {value.tensor.dtype for value in scalars} == {types_pb2.DT_FLOAT}


def test_seed_filters_rows(experiment_dir: Path) -> None:
    from tensorboard.plugins.hparams import api_pb2

    seed1 = api_pb2.ColParams(hparam="seed", filter_interval=api_pb2.Interval(min_value=1, max_value=1))
    _, _, groups = read_plugin(experiment_dir, {"col_params": [seed1]})
    assert sorted(groups) == ["hive/seed1", "wide/seed1"]


def test_rewriting_replaces_the_session(experiment_dir: Path) -> None:
    run_dir = experiment_dir / "hive" / "seed0"
    (first,) = run_dir.glob(HPARAMS_EVENTS_GLOB)
    # As if written by an earlier run of the ablation (a name from the same second would be overwritten anyway).
    first.rename(first.with_name(first.name.replace(first.name.split(".")[3], "0000000001")))
    path = write_hparams(run_dir, {"arm": "hive", "seed": 0, "note": None}, {"hparams/val_loss": 2.5}, 500)
    assert list(run_dir.glob(HPARAMS_EVENTS_GLOB)) == [path]
    assert not list(run_dir.glob(".*partial"))
    _, _, groups = read_plugin(experiment_dir)
    assert len(groups) == 4  # still one session per run
    assert hparams_of(groups["hive/seed0"])["note"] == "none"
    assert metrics_of(groups["hive/seed0"])["hparams/val_loss"] == 2.5


def test_hparams_of_arm_flattens_overrides_and_key_config() -> None:
    overrides = {"model": {"config": {"memory_layers": [1, 3], "memory": {"values": "per_head"}}},
                 "model.upscale.method": "midus", "trainer": {"max_steps": None}, "data": {}}
    config = deep_merge(BASE, {"model": {"upscale": {"method": "midus", "memory": {"topk": 16}},
                                         "config": {"memory": {"values": "per_head"}}}})
    hparams = hparams_of_arm("per_head", None, overrides, config)
    assert hparams["arm"] == "per_head" and hparams["seed"] == "none"
    assert hparams["model.config.memory.values"] == "per_head"
    assert hparams["model.config.memory_layers"] == "[1, 3]"
    assert hparams["model.upscale.method"] == "midus"
    assert hparams["trainer.max_steps"] == "none"  # the override, not the base's 400
    assert hparams["model.upscale.memory.topk"] == 16 and hparams["model.optimizer.learning_rate"] == 0.003
    assert hparams["data.embedded.num_people"] == 200 and hparams["seed_everything"] == 0
    assert "model.upscale.memory.n_subkeys" not in hparams  # absent from the config: no column
    assert "model.config.memory.latent_dim" not in hparams  # neither overridden nor a key field
    assert not any(key.startswith("data.embedded.seed") or key == "data" for key in hparams)
    assert all(isinstance(value, (bool, int, float, str)) for value in hparams.values())


def test_metrics_of_record() -> None:
    record = {"val": {"loss": 3.0, "ppl": 20.0, "best_loss": 2.5, "recall_acc": None, "recall_acc_replay": 0.25},
              "memory_zeroed_delta": {"loss": 0.5, "recall_acc": 0.125}, "knowledge_bits": {"bits": 1234.0},
              "train": {"mean_step_time_s": 0.5}, "latency": None, "params": {"trainable": 3000},
              "optimizer_state": {"bytes": 3 * 2**19}, "peak_memory": {"bytes": 5 * 2**20, "kind": "cpu_max_rss"}}
    assert metrics_of_record(record) == {
        "hparams/val_ppl": 20.0, "hparams/val_best_ppl": math.exp(2.5), "hparams/val_loss": 3.0,
        "hparams/val_best_loss": 2.5, "hparams/recall_acc_replay": 0.25, "hparams/knowledge_bits": 1234.0,
        "hparams/memory_zeroed_delta_loss": 0.5, "hparams/memory_zeroed_delta_recall_acc": 0.125,
        "hparams/step_time_ms": 500.0, "hparams/trainable_params": 3000.0, "hparams/optimizer_state_mib": 1.5,
        "hparams/peak_memory_mib": 5.0,
    }
    assert metrics_of_record({"val": {"best_loss": 1e6}}) == {"hparams/val_best_ppl": math.inf,
                                                              "hparams/val_best_loss": 1e6}
    assert metrics_of_record({}) == {}
