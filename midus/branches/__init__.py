"""Residual branches, selectable per layer by name (see `registry`)."""

from midus.branches.registry import available_branches, build_branch, register_branch

# One import per branch file: importing it registers the branch.
from midus.branches import ffn, hml, multihead_pkm, pkm  # noqa: E402,F401

__all__ = ["available_branches", "build_branch", "register_branch"]
