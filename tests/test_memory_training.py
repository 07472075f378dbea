"""Training memory models: the memory optimizer group and the validation diagnostics."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from midus.model import MidusLM, ModelConfig
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.training.config import MemoryOptimizerConfig, OptimizerConfig, ScheduleConfig
from midus.training.optim import parameter_groups, warmup_cosine

MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8}


def memory_config(vocab_size: int, **overrides) -> ModelConfig:
    fields = dict(
        vocab_size=vocab_size, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, memory_layers=[1],
        memory_branch="hml", memory=dict(MEMORY),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def test_memory_values_get_their_own_rate_and_no_decay() -> None:
    model = MidusLM(memory_config(50, memory_layers=[], layers=[
        {"block": "transformer", "branch": "pkm"}, {"block": "memory", "branch": "hml"},
    ]))
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {g["name"]: g for g in parameter_groups(model, weight_decay=0.1, memory_lr=0.05)}
    assert groups["memory"]["lr"] == 0.05 and groups["memory"]["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in groups["memory"]["params"]) == [
        "blocks.0.branch.values.weight", "blocks.1.branch.values.weight",
    ]
    undecayed = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert {"blocks.0.branch.keys.subkeys", "blocks.1.branch.keys.subkeys"} <= undecayed
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    assert {"blocks.1.branch.head_proj", "blocks.0.branch.query_proj.weight"} <= decayed
    with_keys = {g["name"]: g for g in parameter_groups(model, 0.1, memory_lr=0.05, memory_keys=True)}
    assert "blocks.1.branch.keys.subkeys" in {names[id(p)] for p in with_keys["memory"]["params"]}
    # No memory_lr: the group takes the optimizer's default rate.
    assert "lr" not in {g["name"]: g for g in parameter_groups(model, 0.1)}["memory"]


def test_memory_model_learns_and_logs_slot_diagnostics(tiny_data, tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = CausalLM(
        memory_config(tiny_data.vocab_size), optimizer=OptimizerConfig(learning_rate=1e-2),
        memory_optimizer=MemoryOptimizerConfig(learning_rate=2e-2), schedule=ScheduleConfig(warmup_steps=5),
        probes=ProbeConfig(recall_questions=0),
    )
    trainer = pl.Trainer(
        max_steps=40, val_check_interval=20, limit_val_batches=4, num_sanity_val_steps=-1, log_every_n_steps=5,
        logger=TensorBoardLogger(tmp_path, name="mem", version="hml", default_hp_metric=False),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, tiny_data)
    events = EventAccumulator(str(tmp_path / "mem" / "hml"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    per_head = {f"memory/1/{head}/{stat}" for head in range(4) for stat in ("usage", "kl_uniform", "entropy")}
    assert per_head | {"memory/1/usage", "memory/1/kl_uniform", "memory/1/entropy", "train/lr_memory"} <= tags
    assert [e.step for e in events.Scalars("memory/1/usage")][0] == 0  # the untrained step-0 point
    n_slots = MEMORY["n_subkeys"] ** 2
    for head in range(4):
        usage = events.Scalars(f"memory/1/{head}/usage")[-1].value
        kl = events.Scalars(f"memory/1/{head}/kl_uniform")[-1].value
        entropy = events.Scalars(f"memory/1/{head}/entropy")[-1].value
        assert 0 < usage <= 1 and 0 <= kl <= math.log(n_slots) and 0 <= entropy <= math.log(MEMORY["topk"]) + 1e-6
        assert usage * n_slots == pytest.approx(round(usage * n_slots), abs=1e-3)  # a share of the 64 slots
        # KL from uniform = log N - H(access), and H(access) <= log(slots read): KL >= -log(usage).
        assert kl >= -math.log(usage) - 1e-5
    for stat in ("usage", "kl_uniform", "entropy"):  # the layer's value is the mean over its heads
        heads = [events.Scalars(f"memory/1/{head}/{stat}")[-1].value for head in range(4)]
        assert events.Scalars(f"memory/1/{stat}")[-1].value == pytest.approx(sum(heads) / 4, rel=1e-5), stat
    # The memory group follows the schedule at its own peak: 2× the base rate throughout.
    base, memory = events.Scalars("train/lr")[-1].value, events.Scalars("train/lr_memory")[-1].value
    assert memory == pytest.approx(2 * base, rel=1e-5)
    losses = [e.value for e in events.Scalars("val/loss")]
    assert losses[-1] < losses[0] - 1.0
    # Values left zero would mean the memory never learned anything.
    assert module.model.blocks[1].branch.values.weight.abs().sum() > 0
    # Tracking is off again after validation: training forwards do not count slot reads.
    assert not module.model.blocks[1].branch.keys._forward_hooks


def test_memory_model_trains_under_bf16_mixed_precision(tiny_data) -> None:
    pl.seed_everything(0)
    config = memory_config(tiny_data.vocab_size, memory_layers=[], layers=[
        {"block": "transformer", "branch": "pkm"}, {"block": "memory", "branch": "hml"},
        {"block": "memory", "branch": "multihead_pkm"},
    ])
    module = CausalLM(config, probes=ProbeConfig(recall_questions=0))
    initial_keys = [module.model.blocks[b].branch.keys.subkeys.detach().clone() for b in (0, 1, 2)]
    trainer = pl.Trainer(
        max_steps=3, limit_val_batches=0, precision="bf16-mixed", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, tiny_data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for block, keys in zip((0, 1, 2), initial_keys):
        branch = module.model.blocks[block].branch
        assert branch.values.weight.dtype == torch.float32  # master weights stay fp32
        assert not torch.equal(branch.keys.subkeys.detach(), keys)  # gradients reached the sub-keys


def test_a_constant_memory_schedule_holds_the_memory_rate_while_the_others_decay() -> None:
    model = MidusLM(memory_config(50))
    groups = parameter_groups(model, weight_decay=0.1, memory_lr=0.03)
    optimizer = torch.optim.AdamW(groups, lr=0.003)
    schedule = warmup_cosine(optimizer, warmup_steps=10, total_steps=100, min_lr_ratio=0.1, memory_constant=True)
    rates = []
    for _ in range(100):
        rates.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        optimizer.step()
        schedule.step()
    assert rates[5]["memory"] == pytest.approx(0.015) and rates[5]["decay"] == pytest.approx(0.0015)  # shared warmup
    assert all(step["memory"] == pytest.approx(0.03) for step in rates[10:])  # constant after it ...
    assert rates[99]["decay"] == pytest.approx(0.0003, rel=0.05)  # ... while the rest decays to min_lr_ratio
    # The per-group multipliers survive a checkpoint: a restored schedule continues the same rates.
    restored_optimizer = torch.optim.AdamW(parameter_groups(model, 0.1, memory_lr=0.03), lr=0.003)
    restored = warmup_cosine(restored_optimizer, 10, 100, 0.1, memory_constant=True)
    restored.load_state_dict(schedule.state_dict())
    restored_optimizer.load_state_dict(optimizer.state_dict())
    restored.step()
    schedule.step()
    assert [g["lr"] for g in restored_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    # cosine (the default): the memory group decays with the others, at its own peak.
    cosine = warmup_cosine(torch.optim.AdamW(parameter_groups(model, 0.1, memory_lr=0.03), lr=0.003), 10, 100, 0.1)
    for _ in range(99):
        cosine.optimizer.step()
        cosine.step()
    memory_rate = {g["name"]: g["lr"] for g in cosine.optimizer.param_groups}["memory"]
    assert memory_rate == pytest.approx(0.003, rel=0.05)


def test_an_unknown_memory_schedule_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"model.memory_optimizer.schedule='linear'; expected cosine or constant"):
        CausalLM(memory_config(50), memory_optimizer=MemoryOptimizerConfig(schedule="linear"))


def test_query_norm_gains_are_weight_decayed_and_their_bias_is_not() -> None:
    # The gain scales every score (the retrieval's inverse temperature); decay holds it back,
    # as in the memory_health study. Without it key-normalised retrieval over-sharpened.
    model = MidusLM(memory_config(50, memory={**MEMORY, "query_norm": "layernorm"}))
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in parameter_groups(model, 0.1)}
    assert "blocks.1.branch.keys.query_norm.weight" in groups["decay"]
    assert "blocks.1.branch.keys.query_norm.bias" in groups["no_decay"]
    assert {"blocks.0.attn_norm.weight", "blocks.1.attn_norm.weight"} <= groups["no_decay"]  # other gains are not
