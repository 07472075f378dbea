"""Training and validation loaders that survive a restart and several processes.

A resumed run must see exactly the batches the interrupted one would have seen next: the
shuffle of every epoch is a pure function of (seed, epoch), and the loader's state (epoch,
batches already served in it) travels in Lightning's checkpoint. Lightning saves the state of
any train loader that has ``state_dict``/``load_state_dict`` (``loops.fit_loop.state_dict.
combined_loader``) and restores it before the resumed epoch's first batch.

Each process of a multi-process run (DDP, FSDP) reads its own shard. The samplers subclass
`DistributedSampler`, so Lightning keeps them instead of swapping in its own (which would
shuffle with another seed and, for validation, repeat blocks to even the shards out).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


class EpochShuffleSampler(DistributedSampler):
    """The blocks of one process, reshuffled every epoch from ``seed + epoch`` (torch's
    `DistributedSampler` permutation), optionally starting part-way into the epoch.

    Args:
        dataset: the blocks.
        num_replicas: number of processes sharing the data.
        rank: this process's index among them.
        seed: shuffle seed; the same on every process, so the shards partition one permutation.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        # drop_last: every process gets the same number of distinct blocks (no repeats).
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start_index = 0
        """Indices of this epoch to skip once (a resume part-way into the epoch); reset after use."""

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start_index = self.start_index, 0
        return iter(indices[start:])


class ShardSampler(DistributedSampler):
    """This process's share of the validation blocks in order, without the repeats torch's
    `DistributedSampler` adds to even out shards (a repeated block would count twice in a
    token-weighted loss, and two processes would not report what one does)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class ResumableLoader(DataLoader):
    """A `DataLoader` over an `EpochShuffleSampler` whose position Lightning checkpoints.

    ``state_dict()`` gives the epoch and the batches this process has served in it. Lightning
    fetches one batch at a time from a loader with a length (no read-ahead), so at a checkpoint
    the count equals the batches trained on. ``load_state_dict()`` makes the next pass start
    right after them.
    """

    def __init__(
        self, dataset: Dataset, sampler: EpochShuffleSampler, batch_size: int, drop_last: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers)
        self._served = 0
        self._resume_epoch, self._resume_at = -1, 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first batch, after Lightning has set the epoch's number
        # on the sampler. The resume position applies to the checkpoint's own epoch only: from a
        # checkpoint at an epoch's end (natural, or cut by limit_train_batches) Lightning starts
        # the next epoch, from its first batch.
        resuming = self.sampler.epoch == self._resume_epoch
        self._served = self._resume_at if resuming else 0
        self.sampler.start_index = self._served * self.batch_size
        self._resume_epoch, self._resume_at = -1, 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return {
            "epoch": sampler.epoch, "batches_served": self._served, "batch_size": self.batch_size,
            "num_replicas": sampler.num_replicas, "seed": sampler.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if state["seed"] != sampler.seed:
            log.warning(
                "data: the checkpoint's shuffle seed is %d, this run's %d; continuing with the checkpoint's "
                "(set seed_everything to %d to silence this)", state["seed"], sampler.seed, state["seed"],
            )
            sampler.seed = state["seed"]
        sampler.set_epoch(state["epoch"])
        # Blocks all processes consumed in this epoch, re-divided for this run's processes and batch size:
        # exact when neither changed, otherwise the nearest batch boundary.
        blocks = state["batches_served"] * state["batch_size"] * state["num_replicas"]
        per_process_batches = blocks // (self.batch_size * sampler.num_replicas)
        if blocks != per_process_batches * self.batch_size * sampler.num_replicas:
            log.warning(
                "data: resumed with another batch size or process count; %d of the epoch's blocks are skipped "
                "instead of %d", per_process_batches * self.batch_size * sampler.num_replicas, blocks,
            )
        self._resume_epoch = state["epoch"]
        self._resume_at = per_process_batches if per_process_batches < len(self) else 0
