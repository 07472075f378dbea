"""Memory diagnostics: how evenly the product-key slots are read (PKM literature, §7).

While a `SlotUsageTracker` is on, every `ProductKeys` module of the model counts, per head, how often each slot is
read and the entropy of its retrieval weights. From the counts come the usual diagnostics:

* ``usage``: fraction of the N slots read at least once;
* ``kl_uniform``: KL divergence of the slot-access distribution from uniform, in nats
  (0 when all slots are read equally often, log N when one slot takes every read);
* ``entropy``: mean entropy of one query's k retrieval weights (log k = uniform over k).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from midus.model.block_labels import modules_by_block
from midus.model.retrieval.product_keys import ProductKeys


class SlotUsage:
    """Running per-head slot-read counts and retrieval-weight entropy of one `ProductKeys`."""

    def __init__(self, n_heads: int, n_slots: int, device: torch.device) -> None:
        self.n_heads, self.n_slots = n_heads, n_slots
        self.counts = torch.zeros(n_heads * n_slots, dtype=torch.long, device=device)
        self.entropy_sum = torch.zeros(n_heads, dtype=torch.float64, device=device)
        self.queries = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def record(self, slots: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """slots, weights: (..., heads, k) from one retrieval; keep (heads, k): the reads that count
        (`ProductKeys.head_keep` under ``memory.head_topk``), None for all."""
        heads = torch.arange(self.n_heads, device=slots.device)[:, None]
        read = (slots + heads * self.n_slots).flatten()
        counted = None if keep is None else keep.expand_as(slots).flatten().long()
        self.counts += torch.bincount(read, counted, minlength=self.counts.numel()).long()
        weights = weights.float()
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1)  # (..., heads)
        self.entropy_sum += entropy.reshape(-1, self.n_heads).sum(0).double()
        self.queries += entropy.numel() // self.n_heads

    def reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the counters by `reduce` of them, e.g. their sum over the processes of a run."""
        self.counts, self.entropy_sum = reduce(self.counts), reduce(self.entropy_sum)
        self.queries = reduce(self.queries)

    def per_head(self) -> dict[str, torch.Tensor]:
        """``usage``, ``kl_uniform`` and ``entropy``, each a (heads,) tensor."""
        counts = self.counts.view(self.n_heads, self.n_slots).double()
        total = counts.sum(-1, keepdim=True).clamp_min(1)
        share = counts / total
        kl = torch.where(share > 0, share * (share * self.n_slots).log(), torch.zeros_like(share)).sum(-1)
        return {
            "usage": (counts > 0).double().mean(-1),
            "kl_uniform": kl,
            "entropy": self.entropy_sum / self.queries.clamp_min(1),
        }


def product_key_modules(model: nn.Module) -> dict[str, ProductKeys]:
    """Every `ProductKeys` module by layer label (the block index, e.g. ``"3"``)."""
    return modules_by_block(model, lambda module: isinstance(module, ProductKeys))


class SlotUsageTracker:
    """Counts slot reads of every product-key module of a model through forward hooks.

    ``start()`` attaches a fresh `SlotUsage` per module, ``stop()`` removes the hooks and
    returns ``memory/<layer>/<head>/<stat>`` plus per-layer means; as a context manager it
    starts on entry and stops on exit. The counters stay readable in `usages` after stopping.
    A hook sees the retrieval's own output, so hooks that steer the weights and are attached
    later (head gates) do not change what is counted.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.usages: dict[str, SlotUsage] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def start(self) -> SlotUsageTracker:
        self._detach()
        self.usages = {}
        for label, keys in product_key_modules(self.model).items():
            self.usages[label] = SlotUsage(keys.n_heads, keys.n_slots, keys.subkeys.device)
        self._attach()
        return self

    def _attach(self) -> None:
        for label, keys in product_key_modules(self.model).items():
            self._handles.append(keys.register_forward_hook(_recorder(self.usages[label])))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside the block (forwards that are not the text measured, e.g. a second
        pass of the same batch with the memory zeroed); counting goes on after it if it was on."""
        recording = bool(self._handles)
        self._detach()
        try:
            yield
        finally:
            if recording:
                self._attach()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def stop(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Remove the hooks and return the metrics; `reduce` first combines the counters of
        several processes (each counted its own share of the text), e.g. a sum over them."""
        self._detach()
        metrics: dict[str, float] = {}
        for layer, usage in self.usages.items():
            if reduce is not None:
                usage.reduce(reduce)
            if usage.queries == 0:
                continue
            for stat, values in usage.per_head().items():
                for head, value in enumerate(values.tolist()):
                    metrics[f"memory/{layer}/{head}/{stat}"] = value
                metrics[f"memory/{layer}/{stat}"] = float(values.mean())
        return metrics

    def __enter__(self) -> SlotUsageTracker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self._detach()  # the counters stay in `usages`; metrics only on stop()


def _recorder(usage: SlotUsage):
    def record(module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        weights, slots = output
        usage.record(slots, weights, module.head_keep)  # a slot past a head's own k_h is no read

    return record
