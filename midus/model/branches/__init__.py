"""Residual branches, selectable per layer by name (see `registry`), one file each."""

from midus.model.branches.registry import (
    Branch,
    MemoryBranch,
    available_branches,
    branch_class,
    build_branch,
    register_branch,
)

# One import per branch file: importing it registers the branch.
from midus.model.branches import ffn, hml, multihead_pkm, pkm  # noqa: E402,F401  isort: skip

__all__ = ["Branch", "MemoryBranch", "available_branches", "branch_class", "build_branch", "register_branch"]
