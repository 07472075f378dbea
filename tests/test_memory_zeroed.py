"""``memory_zeroed_delta``: zeroing memory branches is removing them, and validation reports its cost."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from midus.model import MidusLM, ModelConfig
from midus.model.branches.zeroing import memory_branches, zeroed_memory
from midus.model.memory_config import MemoryConfig
from midus.model.transformer import next_token_loss
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.training.memory_health import ENGAGED_LOSS_NATS, ENGAGED_RECALL_DROP, memory_usage, memory_zeroed_delta
from midus.training.run_summary import RunSummary


def _config(vocab_size: int, memory_layers: list[int]) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, memory_layers=memory_layers,
        memory_branch="hml", memory=MemoryConfig(n_subkeys=16, topk=4, latent_dim=8, zero_init_values=False),
    )


def _without_blocks(model: MidusLM, dropped: set[int]) -> MidusLM:
    # A memory block is x + branch(...): with the branch zeroed it is the identity, i.e. absent.
    reference = copy.deepcopy(model)
    reference.blocks = torch.nn.ModuleList(b for i, b in enumerate(reference.blocks) if i not in dropped)
    return reference


def test_zeroing_memory_equals_removing_the_memory_blocks_and_the_hooks_go_away() -> None:
    torch.manual_seed(0)
    model = MidusLM(_config(50, [1, 3])).eval()
    ids = torch.randint(0, 50, (2, 12))
    intact = model(ids)
    assert sorted(memory_branches(model)) == ["1", "3"]
    with torch.no_grad():
        with zeroed_memory(model) as blocks:
            assert blocks == ["1", "3"]
            torch.testing.assert_close(model(ids), _without_blocks(model, {1, 3})(ids), rtol=0, atol=0)
        with zeroed_memory(model, ["3"]):
            torch.testing.assert_close(model(ids), _without_blocks(model, {3})(ids), rtol=0, atol=0)
        assert not torch.allclose(_without_blocks(model, {3})(ids), intact)  # the memory does something
        torch.testing.assert_close(model(ids), intact, rtol=0, atol=0)  # hooks removed
    with pytest.raises(ValueError, match=r"blocks \['2'\] have no memory branch"):
        with zeroed_memory(model, ["2"]):
            pass


def test_validation_reports_what_zeroing_costs_in_total_and_per_block(tiny_data) -> None:
    torch.manual_seed(0)
    module = CausalLM(_config(tiny_data.vocab_size, [1, 3]),
                      probes=ProbeConfig(recall_questions=20, memory_zeroed_per_block=True))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=tiny_data)
    metrics = trainer.callback_metrics

    def loss_without(dropped: set[int]) -> float:
        reference, total, tokens = _without_blocks(module.model, dropped).eval(), 0.0, 0
        with torch.no_grad():
            for batch in tiny_data.val_dataloader():
                ids = batch["input_ids"]
                total += float(next_token_loss(reference(ids[:, :-1]), ids[:, 1:])) * ids[:, 1:].numel()
                tokens += ids[:, 1:].numel()
        return total / tokens

    intact = float(metrics["val/loss"])
    for prefix, dropped in (("", {1, 3}), ("1/", {1}), ("3/", {3})):
        delta = float(metrics[f"memory/zeroed/{prefix}loss_delta"])
        assert delta == pytest.approx(loss_without(dropped) - intact, abs=1e-5)
        assert f"memory/zeroed/{prefix}recall_acc_drop" in metrics
        assert f"memory/zeroed/{prefix}recall_acc_heldout_drop" in metrics
    assert abs(float(metrics["memory/zeroed/loss_delta"])) > 1e-3  # random memory values do change the loss

    record = memory_zeroed_delta(trainer)
    assert record["loss"] == pytest.approx(float(metrics["memory/zeroed/loss_delta"]))
    assert set(record["blocks"]) == {"1", "3"} and set(record["blocks"]["1"]) == {
        "loss", "recall_acc", "recall_acc_heldout"
    }
    # The slot diagnostics of the same validation, per block and as the mean of the blocks.
    usage = memory_usage(trainer, module.model)
    assert set(usage["blocks"]) == {"1", "3"}
    for block in ("1", "3"):
        stats = usage["blocks"][block]
        assert stats["usage"] == pytest.approx(float(metrics[f"memory/{block}/usage"]))
        assert stats["entropy_over_log_k"] == pytest.approx(float(metrics[f"memory/{block}/entropy"]) / math.log(4))
        assert 0 < stats["usage"] <= 1 and 0 < stats["entropy_over_log_k"] <= 1 + 1e-6
    assert usage["kl_uniform"] == pytest.approx(
        (float(metrics["memory/1/kl_uniform"]) + float(metrics["memory/3/kl_uniform"])) / 2
    )


def test_entropy_over_log_k_reads_each_head_against_its_own_k(tiny_data) -> None:
    # Under memory.head_topk a head reading k_h slots has entropy at most log k_h: dividing the
    # block's mean entropy by log of the largest k would understate how flat the skewed heads are.
    torch.manual_seed(0)
    config = _config(tiny_data.vocab_size, [1])
    config = ModelConfig(**{**vars(config), "memory": MemoryConfig(
        n_subkeys=16, topk=4, latent_dim=8, zero_init_values=False, head_topk=[[1, 3, 8, 4]],
    )})
    module = CausalLM(config, probes=ProbeConfig(recall_questions=0))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=tiny_data)
    metrics = trainer.callback_metrics
    heads = [float(metrics[f"memory/1/{head}/entropy"]) for head in range(4)]
    assert heads[0] == 0  # one slot read: no spread
    expected = (0 + heads[1] / math.log(3) + heads[2] / math.log(8) + heads[3] / math.log(4)) / 4
    stats = memory_usage(trainer, module.model)["blocks"]["1"]
    assert stats["entropy_over_log_k"] == pytest.approx(expected)
    assert stats["entropy_over_log_k"] != pytest.approx(float(metrics["memory/1/entropy"]) / math.log(8))
    assert all(entropy <= math.log(k) + 1e-6 for entropy, k in zip(heads[1:], (3, 8, 4)))


def test_a_model_without_memory_records_none(tiny_data) -> None:
    module = CausalLM(ModelConfig(vocab_size=tiny_data.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2),
                      probes=ProbeConfig(recall_questions=0))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=tiny_data)
    assert not any(name.startswith("memory/zeroed") for name in trainer.callback_metrics)
    assert memory_zeroed_delta(trainer) is None
    assert memory_usage(trainer, module.model) is None


def test_the_engaged_step_is_the_first_validation_where_zeroing_costs_enough() -> None:
    summary = RunSummary()
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={}, global_step=0, world_size=1)
    history = [  # (step, loss delta, recall drop) of successive validations
        (50, ENGAGED_LOSS_NATS / 2, 0.0), (100, -0.02, ENGAGED_RECALL_DROP / 2),
        (150, 0.0, ENGAGED_RECALL_DROP), (200, 0.5, 0.5),
    ]
    for step, loss_delta, recall_drop in history:
        trainer.global_step = step
        trainer.callback_metrics = {
            "val/loss": torch.tensor(3.0), "memory/zeroed/loss_delta": torch.tensor(loss_delta),
            "memory/zeroed/recall_acc_drop": torch.tensor(recall_drop),
        }
        summary.on_validation_end(trainer, None)
    assert summary.state_dict()["memory_engaged_step"] == 150
    resumed = RunSummary()  # callback state: a resumed run keeps the step its first part found
    resumed.load_state_dict(summary.state_dict())
    assert resumed.state_dict()["memory_engaged_step"] == 150
    never = RunSummary()
    trainer.callback_metrics = {"val/loss": torch.tensor(3.0), "memory/zeroed/loss_delta": torch.tensor(0.001)}
    never.on_validation_end(trainer, None)
    assert never.state_dict()["memory_engaged_step"] is None


class ForwardCounter:
    """Counts the model's forwards and the validation batches they read (by their first token ids)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows: list[tuple[int, ...]] = []
        model.register_forward_pre_hook(lambda module, args: self.rows.append(tuple(args[0][:, 0].tolist())))


@pytest.mark.parametrize("per_block", [False, True])
def test_the_zeroed_loss_reads_exactly_the_limited_batches_and_is_zero_at_insertion(tiny_data, per_block) -> None:
    # Zero-initialised memory values: the memory outputs exactly zero, as a MIDUS block at insertion.
    config = _config(tiny_data.vocab_size, [1, 3])
    config.memory.zero_init_values = True
    torch.manual_seed(0)
    module = CausalLM(config, probes=ProbeConfig(recall_questions=0, memory_zeroed_per_block=per_block))
    counter = ForwardCounter(module.model)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=3)
    trainer.validate(module, datamodule=tiny_data, verbose=False)
    metrics = trainer.callback_metrics
    assert float(metrics["memory/zeroed/loss_delta"]) == 0.0  # not noise from other batches
    # Every forward read one of the 3 batches val/loss read: intact, all zeroed, and per block if asked.
    batches = [tuple(batch["input_ids"][:, 0].tolist()) for _, batch in zip(range(3), tiny_data.val_dataloader())]
    passes = 2 + (2 if per_block else 0)
    assert counter.rows == [rows for rows in batches for _ in range(passes)]
    assert ("memory/zeroed/1/loss_delta" in metrics) is per_block


def test_the_zeroed_delta_is_the_loss_of_the_limited_batches_without_the_memory(tiny_data) -> None:
    torch.manual_seed(0)
    module = CausalLM(_config(tiny_data.vocab_size, [1, 3]), probes=ProbeConfig(recall_questions=0))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    trainer.validate(module, datamodule=tiny_data, verbose=False)
    reference, total, tokens = _without_blocks(module.model, {1, 3}).eval(), 0.0, 0
    with torch.no_grad():
        for _, batch in zip(range(2), tiny_data.val_dataloader()):
            ids = batch["input_ids"]
            total += float(next_token_loss(reference(ids[:, :-1]), ids[:, 1:])) * ids[:, 1:].numel()
            tokens += ids[:, 1:].numel()
    delta = float(trainer.callback_metrics["memory/zeroed/loss_delta"])
    assert delta == pytest.approx(total / tokens - float(trainer.callback_metrics["val/loss"]), abs=1e-5)
    assert abs(delta) > 1e-3
    assert not any(name.startswith("memory/zeroed/1/") for name in trainer.callback_metrics)  # per block: opt-in


def test_slot_usage_counts_the_intact_forwards_only(tiny_data) -> None:
    # Zeroing block 1's memory changes what block 3 retrieves: counted, it would change block 3's usage.
    usage = {}
    for zeroed in (False, True):
        torch.manual_seed(0)
        module = CausalLM(_config(tiny_data.vocab_size, [1, 3]),
                          probes=ProbeConfig(recall_questions=0, memory_zeroed=zeroed))
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
        trainer.validate(module, datamodule=tiny_data, verbose=False)
        usage[zeroed] = {name: float(value) for name, value in trainer.callback_metrics.items()
                         if name.startswith("memory/") and not name.startswith("memory/zeroed")}
    assert "memory/zeroed/loss_delta" in trainer.callback_metrics
    assert usage[True] and usage[True] == usage[False]
