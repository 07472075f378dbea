"""Sparse memory finetuning (``model.sparse_memory``): the ranking, the sparse table, training and resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from midus.checkpoint import load_kit_checkpoint
from midus.checkpoint.safe_load import kit_safe_globals
from midus.data.datamodule import EmbeddedCorpusConfig, LanguageModelingData
from midus.model import MemoryConfig, MidusLM, ModelConfig
from midus.model.retrieval.slot_ranking import RowReads, batch_row_reads, row_scores, top_rows
from midus.model.retrieval.slot_usage import product_key_modules
from midus.model.retrieval.sparse_values import SparseRowValues
from midus.model.retrieval.value_lookup import MemoryValues
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.training.checkpoints import PeriodicCheckpoint
from midus.training.config import OptimizerConfig, ScheduleConfig, SparseMemoryConfig
from midus.training.sparse_memory import choose_rows, make_sparse


def _config(vocab: int = 64, values: str = "hive", branch: str = "hml") -> ModelConfig:
    memory = MemoryConfig(n_subkeys=8, topk=1, values=values, latent_dim=8, zero_init_values=False)
    return ModelConfig(vocab_size=vocab, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, memory_layers=[1],
                       memory_branch=branch, memory=memory)


@pytest.fixture(scope="module")
def replay_data(tiny_cache: Path) -> LanguageModelingData:
    torch.manual_seed(5)  # the shuffle seed (and so the counting sample) is the global seed at construction
    return LanguageModelingData(
        embedded=EmbeddedCorpusConfig(seed=1, num_people=4, docs_per_person=4, replay_seed=0, replay_num_people=4),
        bpe_vocab_size=300, block_size=32, batch_size=8, cache_dir=str(tiny_cache),
    )


# --- the ranking ------------------------------------------------------------------------------------


def test_tfidf_and_frequency_choose_the_brute_force_top_rows() -> None:
    new = torch.tensor([5, 0, 3, 3, 9, 1, 3, 0])
    background = torch.tensor([4, 0, 0, 1, 4, 2, 1, 0])  # of B = 4 batches
    reads = RowReads(new, background, 4)
    total = int(new.sum())
    brute = [new[i].item() / total * math.log(5 / (background[i].item() + 1)) for i in range(8)]
    for count in (1, 3, 5):
        expected = sorted(sorted(range(8), key=lambda i: (-brute[i], i))[:count])
        assert top_rows(row_scores(reads, "tfidf"), count).tolist() == expected
    # Rows 2 and 6 tie in frequency (3 reads each); the lower index wins, in both rankings' order.
    assert top_rows(row_scores(reads, "frequency"), 3).tolist() == [0, 2, 4]
    # TF-IDF prefers row 2 (never in the background) to row 0, read more but in every background batch.
    assert top_rows(row_scores(reads, "tfidf"), 1).tolist() == [2]


@pytest.mark.parametrize("values", ["hive", "per_head", "shared"])
def test_row_reads_are_the_slot_reads_of_the_rows_each_layout_reads(values: str) -> None:
    torch.manual_seed(0)
    model = MidusLM(_config(values=values)).eval()
    branch = model.blocks[1].branch
    captured = []
    handle = product_key_modules(model)["1"].register_forward_hook(lambda m, i, out: captured.append(out[1]))
    batch = torch.randint(0, 64, (3, 10))
    reads = batch_row_reads(model, batch)["1"]
    handle.remove()
    slots = captured[0]  # (batch, time, heads, k)
    rows = branch.values.weight.shape[0]
    expected = torch.zeros(rows, dtype=torch.long)
    for head in range(4):
        offset = head * branch.n_slots if values == "per_head" else 0
        expected += torch.bincount(slots[..., head, :].flatten() + offset, minlength=rows)
    assert torch.equal(reads, expected)


# --- the sparse table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("branch, values", [("hml", "hive"), ("hml", "per_head"), ("pkm", "hive"),
                                            ("multihead_pkm", "hive")])
def test_a_sparse_table_computes_what_the_full_table_does_and_saves_as_it(branch: str, values: str) -> None:
    torch.manual_seed(0)
    model = MidusLM(_config(values=values, branch=branch))
    batch = torch.randint(0, 64, (2, 12))
    before = model(batch)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    make_sparse(model, SparseMemoryConfig(trainable_slots=3), {"1": torch.tensor([7, 2, 11])})
    values_module = model.blocks[1].branch.values
    assert isinstance(values_module, SparseRowValues)
    assert torch.equal(model(batch), before)  # bit for bit
    saved = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[name], state[name]) for name in state)
    # Everything else froze (freeze_rest), and the parameters still count the table once.
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["blocks.1.branch.values.trainable"]
    assert model.num_parameters() == sum(tensor.numel() for tensor in state.values())
    # Loading an ordinary table splits it by the same rows; other keys are refused as for MemoryValues.
    table = torch.randn_like(state["blocks.1.branch.values.weight"])
    values_module.load_state_dict({"weight": table})
    assert torch.equal(values_module.weight, table) and torch.equal(values_module.trainable, table[[2, 7, 11]])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        values_module.load_state_dict({"weight": table, "trainable": table[:3]})


def test_only_the_chosen_rows_get_a_gradient() -> None:
    torch.manual_seed(0)
    table = torch.randn(16, 4)
    full = MemoryValues(16, 4, zero_init=True)
    full.weight.data.copy_(table)
    sparse = SparseRowValues(table, torch.tensor([1, 5]))
    slots, weights = torch.randint(0, 16, (20, 3)), torch.rand(20, 3)
    full(slots, weights).square().sum().backward()
    sparse(slots, weights).square().sum().backward()
    assert torch.equal(sparse.trainable.grad, full.weight.grad[[1, 5]])
    assert sparse.frozen.grad is None


# --- a fit --------------------------------------------------------------------------------------------


def _module(data, sparse: SparseMemoryConfig | None = None, seed: int = 3) -> CausalLM:
    torch.manual_seed(seed)
    config = _config(vocab=data.vocab_size)
    options = {} if sparse is None else {"sparse_memory": sparse}
    return CausalLM(config, probes=ProbeConfig(recall_questions=0), optimizer=OptimizerConfig(learning_rate=1e-2),
                    schedule=ScheduleConfig(warmup_steps=2), **options)


class Preempted(RuntimeError):
    """What the test's stand-in for a preemption raises."""


class Losses(pl.Callback):
    def __init__(self, stop_before: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.stop_before = stop_before

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.stop_before:
            raise Preempted(f"preempted before step {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = outputs["loss"].item()


def _fit(module: CausalLM, data, root: Path, steps: int, stop_before=None, ckpt_path=None) -> tuple[Losses, pl.Trainer]:
    pl.seed_everything(0)
    losses = Losses(stop_before)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root,
        callbacks=[losses, PeriodicCheckpoint(every_n_train_steps=1, keep=-1, dirpath=str(root / "checkpoints"))],
    )
    try:
        with torch.serialization.safe_globals(kit_safe_globals()):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Preempted:
        pass
    return losses, trainer


def test_off_is_the_fit_without_the_section(replay_data, tmp_path, monkeypatch) -> None:
    plain, _ = _fit(_module(replay_data), replay_data, tmp_path / "plain", 3)
    monkeypatch.setattr(LanguageModelingData, "population_blocks", lambda *args: pytest.fail("counted"))
    off = _module(replay_data, SparseMemoryConfig(trainable_slots=0, ranking="frequency", count_batches=2,
                                                  freeze_rest=False))
    switched_off, _ = _fit(off, replay_data, tmp_path / "off", 3)
    assert switched_off.losses == plain.losses  # bit for bit
    assert isinstance(off.model.blocks[1].branch.values, MemoryValues)


def test_sparse_fit_trains_only_the_chosen_rows_with_state_for_them_alone(replay_data, tmp_path) -> None:
    module = _module(replay_data, SparseMemoryConfig(trainable_slots=3, count_batches=4, count_batch_size=1))
    before = {name: tensor.clone() for name, tensor in module.model.state_dict().items()}
    # The rows the fit will choose: the same count on the untouched model, by the brute-force rule.
    reads_new = sum(batch_row_reads(module.model, batch[:, :-1])["1"]
                    for batch in replay_data.population_blocks("new", 4).split(1))
    background = [batch_row_reads(module.model, batch[:, :-1])["1"] > 0
                  for batch in replay_data.population_blocks("background", 4).split(1)]
    df = sum(present.long() for present in background)
    rows = reads_new.numel()
    scores = [reads_new[i].item() / reads_new.sum().item() * math.log((len(background) + 1) / (df[i].item() + 1))
              for i in range(rows)]
    expected = sorted(sorted(range(rows), key=lambda i: (-scores[i], i))[:3])
    assert all(scores[i] > 0 for i in expected)  # chosen by the ranking, not by row order among ties

    _, trainer = _fit(module, replay_data, tmp_path, 4)
    values = module.model.blocks[1].branch.values
    assert values.trainable_rows.tolist() == expected
    after = module.model.state_dict()
    key = "blocks.1.branch.values.weight"
    changed = (after[key] != before[key]).any(-1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(expected)
    assert all(torch.equal(after[name], before[name]) for name in before if name != key)  # freeze_rest
    # AdamW holds state for the 3 trainable rows only: exp_avg and exp_avg_sq of (3, 8).
    state = trainer.optimizers[0].state
    assert [tuple(s["exp_avg"].shape) for s in state.values()] == [(3, 8)]  # latent_dim 8
    # The checkpoint holds the ordinary model (the table merged), which loads as any other.
    checkpoint = tmp_path / "checkpoints" / "step-4.ckpt"
    loaded = load_kit_checkpoint(str(checkpoint))
    assert isinstance(loaded.blocks[1].branch.values, MemoryValues)
    assert torch.equal(loaded.state_dict()[key], after[key])


@pytest.mark.slow
def test_a_resumed_sparse_fit_continues_the_uninterrupted_one(replay_data, tmp_path) -> None:
    settings = SparseMemoryConfig(trainable_slots=3, count_batches=4, count_batch_size=1, freeze_rest=False)
    whole, _ = _fit(_module(replay_data, settings), replay_data, tmp_path / "whole", 6)
    first, _ = _fit(_module(replay_data, settings), replay_data, tmp_path / "resumed", 6, stop_before=3)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-3.ckpt"
    # Built from another seed, it would count other rows; the checkpoint's rows and weights replace them.
    resumed = _module(replay_data, settings, seed=4)
    counted_afresh = choose_rows(resumed.model, settings, replay_data, torch.device("cpu"))["1"]
    second, _ = _fit(resumed, replay_data, tmp_path / "resumed", 6, ckpt_path=checkpoint)
    assert sorted(second.losses) == [3, 4, 5]
    rows = resumed.model.blocks[1].branch.values.trainable_rows
    assert torch.equal(rows, torch.load(checkpoint, weights_only=False)["midus_sparse_memory"]["1"])
    assert not torch.equal(rows, counted_afresh)
    assert {**first.losses, **second.losses} == whole.losses  # bit for bit
    # A fit that is not sparse refuses the sparse checkpoint, naming the field.
    with pytest.raises(ValueError, match="model.sparse_memory.trainable_slots=0"):
        _fit(_module(replay_data), replay_data, tmp_path / "other", 6, ckpt_path=checkpoint)
