"""A preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every attention layer, (batch, kv_heads, max_len, head_dim) each.

    Each attention layer owns one slot, indexed by its position in the stack, so blocks
    that are inserted later (up-scaling) get their own slot by construction.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len

    def update(
        self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values for positions [start, start+time) and return all up to there."""
        end = start + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def copy_prefix_from(self, source: KVCache, rows: torch.Tensor, length: int) -> None:
        """Positions [0, length) of `source`'s batch `rows` (in order) into every row of this cache:
        many continuations of shared prefixes decoded from one cache."""
        for layer in range(len(self.keys)):
            self.keys[layer][:, :, :length] = source.keys[layer][rows, :, :length]
            self.values[layer][:, :, :length] = source.values[layer][rows, :, :length]

    def copy_rows_from(self, source: KVCache, rows: slice) -> None:
        """All of `source` into this cache's batch `rows` (a chunk of a larger batch)."""
        for layer in range(len(self.keys)):
            self.keys[layer][rows] = source.keys[layer]
            self.values[layer][rows] = source.values[layer]
