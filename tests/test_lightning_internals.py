"""Lightning's internals are reached from one module, `midus.training.lightning_internals`: no other
kit module imports a Lightning module outside its public paths, calls ``super()._…``, reads a
private attribute of a trainer, strategy, logger or loop, or overrides a private method of a
Lightning class. Each reach there names the Lightning version it was read against."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

from test_layering import import_graph, module_names

INTERNALS = "midus.training.lightning_internals"
PUBLIC_LIGHTNING = {
    "lightning", "lightning.pytorch", "lightning.pytorch.callbacks", "lightning.pytorch.cli",
    "lightning.pytorch.loggers", "lightning.pytorch.strategies", "lightning.pytorch.utilities", "lightning.fabric",
    "lightning.fabric.utilities",
}
"""Import paths Lightning documents as its API (a new one joins here once checked to be public)."""
LIGHTNING_OBJECTS = {"trainer", "_trainer", "strategy", "logger", "fit_loop", "epoch_loop", "cli"}
"""Names under which the kit holds Lightning's objects: ``<one of these>._private`` is a reach."""


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def reaches(path: Path) -> list[str]:
    """The reaches into Lightning's internals written in `path`, as ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightning":
            if node.module not in PUBLIC_LIGHTNING:
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] == "lightning" and alias.name not in PUBLIC_LIGHTNING]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                found.append(f"{node.lineno}: super().{node.attr}")
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
            if name in LIGHTNING_OBJECTS or node.attr == "_trainer":
                found.append(f"{node.lineno}: {name}.{node.attr}")
    return sorted(found, key=lambda reach: int(reach.split(":")[0]))


def test_the_reach_finder_sees_each_kind_of_reach(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "from lightning.pytorch.trainer.states import TrainerFn\nimport lightning.pytorch.loops\n"
        "from lightning.pytorch.callbacks import ModelCheckpoint\n"
        "def f(self, trainer):\n    super()._parse_ckpt_path()\n    trainer._logger_connector\n"
        "    self.trainer.fit_loop._data_fetcher\n    self._trainer\n    self._own\n"
    )
    assert reaches(source) == [
        "1: from lightning.pytorch.trainer.states import ...", "2: import lightning.pytorch.loops",
        "5: super()._parse_ckpt_path", "6: trainer._logger_connector", "7: fit_loop._data_fetcher", "8: self._trainer",
    ]


def test_only_the_internals_module_reaches_into_lightning() -> None:
    found = [
        f"{name}:{reach}" for name, path in module_names().items() if name != INTERNALS for reach in reaches(path)
    ]
    assert not found, f"reach Lightning's internals through {INTERNALS}:\n" + "\n".join(found)


def test_no_kit_class_overrides_a_private_lightning_method() -> None:
    _, external = import_graph()
    overrides = []
    for name in sorted(external):
        if "lightning" not in external[name] or name == INTERNALS:
            continue
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != name:
                continue
            lightning_bases = [base for base in cls.__mro__ if base.__module__.split(".")[0] == "lightning"]
            for attribute in vars(cls):
                if _private(attribute) and any(attribute in vars(base) for base in lightning_bases):
                    overrides.append(f"{name}.{cls.__qualname__}.{attribute}")
    assert not overrides, f"override Lightning's private methods in {INTERNALS} only:\n" + "\n".join(overrides)
