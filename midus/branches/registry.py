"""Residual branches by name.

A branch is an ``nn.Module`` built as ``cls(config, layer_index)`` whose ``forward`` maps
its input (batch, time, d_model) to an update of the same shape that the block adds to the
residual stream. In a Transformer block the input is the normalised residual stream; in a
memory block it is the attention heads' outputs, concatenated (heads × head_dim = d_model).
A branch class that sets ``reads_attention_heads = True`` (HML) only works in memory blocks. Adding a branch is one new file in this package with a
``@register_branch("name")`` class, plus one import line in ``midus/branches/__init__.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:
    from midus.model.config import ModelConfig

_BRANCHES: dict[str, type[nn.Module]] = {}


def register_branch(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a branch selectable as ``branch: <name>`` in the model config."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _BRANCHES and _BRANCHES[name] is not cls:
            raise ValueError(f"branch name {name!r} is registered twice ({_BRANCHES[name].__name__}, {cls.__name__})")
        _BRANCHES[name] = cls
        return cls

    return add


def available_branches() -> tuple[str, ...]:
    """Names accepted by ``ModelConfig.branch`` and ``LayerSpec.branch``."""
    import midus.branches  # noqa: F401  (importing the package registers every branch)

    return tuple(_BRANCHES)


def branch_class(name: str) -> type[nn.Module]:
    """The class registered as `name`."""
    available_branches()
    return _BRANCHES[name]


def build_branch(name: str, config: ModelConfig, layer_index: int) -> nn.Module:
    """Instantiate the branch registered as `name` for layer `layer_index`."""
    available_branches()
    return _BRANCHES[name](config, layer_index)
