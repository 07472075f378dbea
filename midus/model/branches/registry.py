"""Residual branches by name, and the contract every branch keeps.

A branch is a `Branch` subclass built as ``cls(config, layer_index)`` whose ``forward`` maps
its input (batch, time, d_model) to an update of the same shape that the block adds to the
residual stream. In a Transformer block the input is the normalised residual stream; in a
memory block it is the attention heads' outputs a_1 … a_H, concatenated: heads × head_dim wide,
which is d_model unless the model's heads are decoupled (`ModelConfig.head_width`, Qwen3-0.6B);
`ModelConfig.branch_input_width` gives the width. The output is d_model wide in every case.

Adding a branch is one new file in this package with a ``@register_branch("name")`` class,
plus one import line in ``midus/model/branches/__init__.py``.

This module imports nothing of the kit: the model config checks branch names and
capabilities against it, and the branch files import the config, so the registry sits below
both. Its table is full whenever this module is importable: importing it runs the package's
``__init__`` first, which imports every branch file.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from torch import nn


class Branch(nn.Module):
    """Base class of every residual branch: the capabilities blocks, config and optimizer read.

    Capabilities are class attributes, so they are known before a branch is built (the model
    config validates a stack of branch names without building anything).
    """

    reads_attention_heads: ClassVar[bool] = False
    """The input is the attention heads' outputs (a_1 … a_H), which only a memory block provides."""
    is_product_key_memory: ClassVar[bool] = False
    """A product-key memory: its parameters count as ``params/memory``; slot diagnostics apply."""

    @classmethod
    def decoupled_heads_error(cls, memory: Any) -> str | None:
        """In a memory block whose heads are decoupled (n_heads · head_dim ≠ d_model), why this
        branch cannot run under `memory` (a `MemoryConfig`), naming the field to change; None when
        it can. A branch can when it sizes its input by `ModelConfig.branch_input_width` and writes
        d_model; the default refuses, so a branch that assumes a d_model-wide input fails at
        config validation, not with a shape error in its first forward."""
        return (f"branch class {cls.__name__} does not declare that it reads n_heads · head_dim wide heads "
                "(Branch.decoupled_heads_error); use a branch that does (hml, pkm, multihead_pkm, ffn)")

    def value_tables(self) -> list[nn.Parameter]:
        """Memory value tables: their own optimizer group (``model.memory_optimizer``, no weight decay)."""
        return []

    def subkey_tables(self) -> list[nn.Parameter]:
        """Product-key sub-keys: never weight-decayed; join the memory group with ``model.memory_optimizer.subkeys``."""
        return []


class MemoryBranch(Branch):
    """A product-key memory branch: retrieval in `keys` (a `ProductKeys`), values in `values`
    (a `MemoryValues`); both memory branch families (PKM and HML) build on it."""

    is_product_key_memory: ClassVar[bool] = True

    def value_tables(self) -> list[nn.Parameter]:
        # The table, or under sparse memory finetuning its trainable rows and its frozen rest
        # (`midus.model.retrieval.sparse_values.SparseRowValues`).
        return list(self.values.parameters())

    def subkey_tables(self) -> list[nn.Parameter]:
        return [self.keys.subkeys]

    def value_row_reads(self, counts: Any) -> Any:
        """Reads per value row from reads per (head, slot): `counts` (heads, n_slots) → (value rows,).

        By default every head reads the same table (PKM, multi-head PKM, HML ``shared`` and ``hive``):
        a row's reads are its slot's reads summed over the heads. A branch whose heads own stacked
        tables says otherwise (HML ``per_head``). Sparse memory finetuning ranks rows by these.
        """
        return counts.sum(0)


_BRANCHES: dict[str, type[Branch]] = {}


def register_branch(name: str) -> Callable[[type[Branch]], type[Branch]]:
    """Class decorator: make a `Branch` subclass selectable as ``branch: <name>`` in the model config."""

    def add(cls: type[Any]) -> type[Branch]:
        if not (isinstance(cls, type) and issubclass(cls, Branch)):
            raise TypeError(f"branch {name!r}: {cls!r} must subclass midus.model.branches.Branch")
        if name in _BRANCHES and _BRANCHES[name] is not cls:
            raise ValueError(f"branch name {name!r} is registered twice ({_BRANCHES[name].__name__}, {cls.__name__})")
        _BRANCHES[name] = cls
        return cls

    return add


def available_branches() -> tuple[str, ...]:
    """Names accepted by ``ModelConfig.branch`` and ``LayerSpec.branch``."""
    return tuple(_BRANCHES)


def branch_class(name: str) -> type[Branch]:
    """The class registered as `name`.

    Raises:
        KeyError: no branch has that name.
    """
    return _BRANCHES[name]


def build_branch(name: str, config: Any, layer_index: int) -> Branch:
    """Instantiate the branch registered as `name` for layer `layer_index` of `config` (a ModelConfig)."""
    return _BRANCHES[name](config, layer_index)
