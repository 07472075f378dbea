"""`TrainingProgress`: what one process has trained on since step 0, and how fast.

Tokens, sequences and training batches (several per optimizer step under gradient accumulation)
are counted by `CausalLM` and checkpointed with it, so a resumed run's ``train/tokens`` and the
run summary's counts continue the interrupted run's; the rate is Lightning's `Throughput` over the
last ten batches (``train/tokens_per_sec``).
"""

from __future__ import annotations

import time

from lightning.fabric.utilities import Throughput


class TrainingProgress:
    """This process's training counts since step 0 and their recent rate."""

    def __init__(self) -> None:
        self.tokens = 0
        self.sequences = 0
        self.batches = 0
        self.throughput = Throughput(window_size=10)
        self._started_at = 0.0

    def start(self, world_size: int) -> None:
        """A fit begins (also a resumed one): rates count from now; whole-run rates scale by `world_size`."""
        self.throughput.world_size = world_size
        self._started_at = time.perf_counter()

    def add_batch(self, tokens: int, sequences: int) -> None:
        """One training batch of `sequences` rows holding `tokens` predicted tokens."""
        self.tokens += tokens
        self.sequences += sequences
        self.batches += 1

    def update_rate(self) -> None:
        """Record the time after a batch (every batch: the rate is a window over the last ones)."""
        self.throughput.update(
            time=time.perf_counter() - self._started_at,
            batches=self.batches,  # not global_step: it stands still inside an accumulation
            samples=self.sequences,
            lengths=self.tokens,
        )

    def tokens_per_sec(self) -> float | None:
        """This process's tokens per second over the window (None until the window has two points)."""
        rates = self.throughput.compute()
        return rates.get("items_per_sec", rates.get("device/items_per_sec"))

    def state_dict(self) -> dict[str, int]:
        """The counts as a checkpoint stores them."""
        return {"tokens": self.tokens, "sequences": self.sequences, "batches": self.batches}

    def load_state_dict(self, progress: dict[str, int], global_step: int) -> None:
        """Continue from a checkpoint's counts; one written before they were stored falls back to its
        step count for sequences and batches, which keeps `Throughput` (samples >= step) valid."""
        self.tokens = int(progress.get("tokens", 0))
        self.sequences = int(progress.get("sequences", global_step))
        self.batches = int(progress.get("batches", global_step))
