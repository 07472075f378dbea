"""The package layering of `midus`, written once here and checked: no import cycles anywhere,
every package imports only the layers below it, and the plain-PyTorch layers never reach
Lightning. Imports are read with `ast`, every one of them: module level, inside functions and
under ``TYPE_CHECKING``, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "midus"

# Unit → the units it may import. A unit is a package (or top-level module) of midus; the
# order is bottom to top. docs/layout.md describes the same layers.
LAYERS: dict[str, set[str]] = {
    "midus.model": set(),
    "midus.checkpoint": {"midus.model"},
    "midus.upscale": {"midus.model"},
    "midus.run_files": set(),
    "midus.host_allocator": set(),
    "midus.moved_keys": set(),
    "midus.data": {"midus.checkpoint", "midus.model", "midus.moved_keys"},
    "midus.probes": {"midus.model", "midus.data"},
    "midus.training": {"midus.model", "midus.checkpoint", "midus.upscale", "midus.data", "midus.probes",
                       "midus.run_files", "midus.moved_keys"},
    # The results tables are report's; the runner writes an ablation's summary.md and .csv with them.
    "midus.report": {"midus.run_files"},
    "midus.ablation": {"midus.training", "midus.model", "midus.run_files", "midus.report", "midus.moved_keys"},
    "midus.analysis": {"midus.model", "midus.checkpoint", "midus.data", "midus.ablation", "midus.run_files",
                       "midus.moved_keys"},
    "midus.evaluation": {"midus.model", "midus.checkpoint", "midus.data", "midus.analysis"},
    "midus.cli": {"midus.ablation", "midus.training", "midus.host_allocator", "midus.moved_keys"},
    "midus.__main__": {"midus.cli"},
    "midus": set(),
}
# Modules that must never import Lightning, directly or through the kit modules they import.
LIGHTNING_FREE = ("midus.model", "midus.checkpoint", "midus.upscale", "midus.run_files", "midus.moved_keys",
                  "midus.data", "midus.probes",
                  "midus.report", "midus.ablation.config", "midus.ablation.command_line", "midus.analysis",
                  "midus.evaluation")
LIGHTNING_ALLOWED_IN_DATA = {"midus.data.datamodule"}  # the LightningDataModule wrapper of TextData
LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics")


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(kit modules, top-level third-party packages) that the file imports anywhere."""
    kit, external = set(), set()

    def add(target: str) -> None:
        if target.split(".")[0] != "midus":
            external.add(target.split(".")[0])
            return
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        kit.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the kit imports absolutely"
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                add(submodule if submodule in known else node.module)
    return kit, external


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = module_names()
    graph, external = {}, {}
    for name, path in modules.items():
        kit, outside = imports_of(path, set(modules))
        graph[name], external[name] = kit - {name}, outside
    return graph, external


def unit_of(module: str) -> str:
    return max((unit for unit in LAYERS if module == unit or module.startswith(unit + ".")), key=len)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module: each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_graph_reader_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from midus.model.config import ModelConfig\n"
        "def f():\n    import lightning.pytorch\n    from midus.model import branches\n"
    )
    kit, external = imports_of(source, {"midus.model", "midus.model.config", "midus.model.branches"})
    assert kit == {"midus.model.config", "midus.model.branches"}
    assert external == {"typing", "lightning"}


def test_cycle_finder_finds_a_two_module_cycle() -> None:
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert strongly_connected(graph) == [["a", "b"]]


def test_no_import_cycles() -> None:
    graph, _ = import_graph()
    assert strongly_connected(graph) == []


def test_every_module_belongs_to_a_layer_and_imports_only_the_layers_below() -> None:
    graph, _ = import_graph()
    violations = []
    for module, targets in graph.items():
        unit = unit_of(module)
        for target in targets:
            target_unit = unit_of(target)
            if target_unit != unit and target_unit not in LAYERS[unit]:
                violations.append(f"{module} -> {target} ({unit} may import {sorted(LAYERS[unit]) or 'nothing'})")
    assert not violations, "\n".join(sorted(violations))


def test_plain_layers_never_reach_lightning() -> None:
    graph, external = import_graph()
    direct = {module for module, packages in external.items() if packages & set(LIGHTNING_PACKAGES)}
    offenders = []
    for module in graph:
        if not module.startswith(LIGHTNING_FREE) or module in LIGHTNING_ALLOWED_IN_DATA:
            continue
        seen, todo = set(), [module]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            todo += graph[current]
        if seen & direct:
            offenders.append(f"{module} reaches {sorted(seen & direct)}")
    assert not offenders, "\n".join(offenders)


def test_every_layer_is_a_documented_package_named_in_the_layout_page() -> None:
    layout = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    for unit in LAYERS:
        if unit in ("midus", "midus.__main__"):
            continue
        path = ROOT / Path(*unit.split("."))
        module = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        assert ast.get_docstring(ast.parse(module.read_text(encoding="utf-8"))), f"{module} has no docstring"
        shown = f"midus/{unit.split('.', 1)[1]}" + ("/" if path.is_dir() else ".py")
        assert shown in layout, f"docs/layout.md does not list {shown}"


@pytest.mark.slow
def test_reading_commands_and_every_kit_help_never_import_lightning(tmp_path: Path) -> None:
    from midus.cli import KIT_COMMANDS

    arm = tmp_path / "experiment" / "arm"
    arm.mkdir(parents=True)
    (arm / "summary.json").write_text('{"schema_version": 1, "val": {"loss": 3.0, "ppl": 20.1}}')
    (arm / "events.out.tfevents.0.host").write_bytes(b"")
    script = (
        "import sys\nfrom midus.cli import main\n"
        f"for command in {sorted(KIT_COMMANDS)!r}:\n"
        "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
        f"main(['report', {str(tmp_path / 'experiment')!r}])\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING_PACKAGES!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "experiment" / "report.md").is_file()
    assert result.stdout.strip().splitlines()[-1] == "[]"
