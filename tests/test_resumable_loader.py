"""The loaders behind exact resume and multi-process runs, without a Trainer where possible."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from midus.data.resumable_loader import EpochShuffleSampler, ResumableLoader, ShardSampler
from midus.model import ModelConfig
from midus.probes import ProbeConfig
from midus.training import CausalLM

BLOCKS = [{"input_ids": torch.tensor([index])} for index in range(23)]


def _ids(batches) -> list[int]:
    return [int(value) for batch in batches for value in batch["input_ids"].flatten()]


def test_validation_shards_cover_every_block_exactly_once() -> None:
    for replicas in (1, 2, 3, 5):
        shards = [list(ShardSampler(BLOCKS, replicas, rank)) for rank in range(replicas)]
        assert sorted(index for shard in shards for index in shard) == list(range(len(BLOCKS)))
        assert [len(ShardSampler(BLOCKS, replicas, rank)) for rank in range(replicas)] == [len(s) for s in shards]


def test_training_shards_partition_one_seeded_permutation_per_epoch() -> None:
    def shard(rank: int, epoch: int, seed: int = 3) -> list[int]:
        sampler = EpochShuffleSampler(BLOCKS, 2, rank, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    both = shard(0, 0) + shard(1, 0)
    assert len(set(both)) == len(both) == 22  # 23 blocks over 2 processes: one left out, none repeated
    assert shard(0, 0) == shard(0, 0) and shard(0, 1) != shard(0, 0)  # a pure function of (seed, epoch)
    assert shard(0, 0, seed=4) != shard(0, 0)


def test_a_loader_restored_from_its_state_serves_the_rest_of_the_epoch() -> None:
    def loader() -> ResumableLoader:
        return ResumableLoader(BLOCKS, EpochShuffleSampler(BLOCKS, 1, 0, seed=5), batch_size=4)

    original = loader()
    original.sampler.set_epoch(2)
    batches = iter(original)
    served = [next(batches) for _ in range(3)]
    state = original.state_dict()
    assert (state["epoch"], state["batches_served"]) == (2, 3)
    rest = list(batches)

    restored = loader()
    restored.load_state_dict(state)
    restored.sampler.set_epoch(2)  # what Lightning does at the resumed epoch's start
    assert _ids(restored) == _ids(rest) and _ids(served + rest) == _ids(original)
    restored.sampler.set_epoch(3)
    assert len(list(restored)) == len(original)  # the next epoch starts from its first batch

    finished = loader()
    finished.load_state_dict({**state, "batches_served": len(original)})  # saved after the last batch
    finished.sampler.set_epoch(3)
    assert len(list(finished)) == len(original)


def test_overfit_batches_trains_on_a_plain_loader(tiny_data) -> None:
    # Lightning rebuilds the train loader around a SequentialSampler for overfit_batches.
    module = CausalLM(
        ModelConfig(vocab_size=tiny_data.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2),
        probes=ProbeConfig(recall_questions=0),
    )
    trainer = pl.Trainer(
        max_steps=3, overfit_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=tiny_data)
    assert trainer.global_step == 3
