"""Reading-path count: how many `midus` modules a reader follows from the entry point.

What it measures
    Issue 28 asks that following a training step, a validation epoch and ``fit --config
    <ablation>.yaml`` from the entry point means reading fewer modules. This script runs both
    paths through ``midus.cli.main`` (what ``python -m midus`` calls), in-process under
    `cProfile`, and prints for each the number and the list of distinct ``midus`` modules whose
    functions executed:

    * ``fit``: ``fit --config <quickstart.yaml, trainer shrunk>``: a from-scratch model, a couple
      of training steps and one validation epoch (the embedded corpus, its tokenizer, the recall
      probe), logged to a temporary folder;
    * ``ablation``: ``fit --config <that YAML with a one-arm ablation: section> --arm only``: the
      runner's parse, arm validation, start planning, the arm's launch and the summary tables.
      Only the runner's process is counted; the arm itself is a child ``fit`` (the path above).

    A module counts when one of its functions ran (a code object with its own locals, a lambda
    included); module and class bodies that ran only on import do not, nor do comprehensions (they
    run inside a function that counts already). Modules are named from the files the profiler saw,
    relative to the imported ``midus`` package, so renamed or moved modules need no change here.
    Each path runs in its own fresh interpreter, so neither sees the other's caches.

How to run
    python benchmarks/reading_path.py                 # both paths (about a minute on 2 CPU cores)
    python benchmarks/reading_path.py --path fit      # one of them
    python benchmarks/reading_path.py --json          # one JSON object per path

It is a benchmark, run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE_YAML = ROOT / "experiments" / "quickstart.yaml"
PATHS = ("fit", "ablation")
# Only trainer settings (Lightning's own names) are changed, so the kit's argument renames leave this
# script working; the model and data stay quickstart's.
TRAINER = {
    "max_steps": 2,
    "val_check_interval": 2,
    "check_val_every_n_epoch": None,
    "limit_val_batches": 2,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "enable_progress_bar": False,
}
_COMPREHENSIONS = {"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}


def tiny_config(save_dir: Path) -> dict:
    """quickstart.yaml with a two-step trainer, logging under `save_dir`."""
    config = yaml.safe_load(BASE_YAML.read_text(encoding="utf-8"))
    config["trainer"].update(TRAINER)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(save_dir)
    return config


def command_of(path: str, folder: Path) -> list[str]:
    """The ``python -m midus`` arguments of `path`, its YAML written into `folder`."""
    config = tiny_config(folder / "runs")
    if path == "ablation":
        config = {"ablation": {"name": "reading_path", "arms": {"only": {}}}, **config}
    config_file = folder / f"{path}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    command = ["fit", "--config", str(config_file)]
    return [*command, "--arm", "only"] if path == "ablation" else command


def module_of(filename: str, package: Path) -> str | None:
    """The dotted ``midus`` module of a source file, None outside the package."""
    try:
        relative = Path(filename).resolve().relative_to(package.parent)
    except ValueError:
        return None
    if relative.suffix != ".py" or relative.parts[0] != package.name:
        return None
    parts = relative.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def executed_modules(profile: cProfile.Profile, package: Path) -> dict[str, int]:
    """``midus`` module -> how many of its functions ran (import-time bodies and comprehensions left out)."""
    functions: dict[str, set[tuple[str, int]]] = {}
    for entry in profile.getstats():
        code = entry.code
        if not isinstance(code, types.CodeType) or not code.co_flags & inspect.CO_NEWLOCALS:
            continue  # a builtin, or a module or class body
        if code.co_name in _COMPREHENSIONS:
            continue
        module = module_of(code.co_filename, package)
        if module is not None:
            functions.setdefault(module, set()).add((code.co_name, code.co_firstlineno))
    return {module: len(names) for module, names in sorted(functions.items())}


def run_one(path: str) -> dict:
    """Run `path` in this process under the profiler; its modules, and the midus modules merely imported."""
    with tempfile.TemporaryDirectory(prefix="reading_path_") as folder:
        command = command_of(path, Path(folder))
        os.chdir(folder)  # anything a run writes relative to the working directory lands here
        import midus
        from midus.cli import main

        package = Path(midus.__file__).resolve().parent
        profile = cProfile.Profile()
        status: object = 0
        profile.enable()
        try:
            main(command)
        except SystemExit as stop:
            status = stop.code
        finally:
            profile.disable()
        modules = executed_modules(profile, package)
        imported = sorted(name for name in sys.modules if name == "midus" or name.startswith("midus."))
        return {"path": path, "command": command, "exit": status, "modules": modules, "imported": imported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=PATHS, action="append", help="a path to count (default: both)")
    parser.add_argument("--json", action="store_true", help="one JSON object per path instead of the listing")
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # the child process of one path
    args = parser.parse_args()
    if args.one:
        print("READING_PATH " + json.dumps(run_one(args.one)), flush=True)
        return
    results = []
    for path in args.path or PATHS:
        child = subprocess.run(
            [sys.executable, __file__, "--one", path], capture_output=True, text=True, cwd=ROOT, check=False
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("READING_PATH ")]
        if child.returncode or not lines:
            sys.exit(f"{path}: exit {child.returncode}\n{child.stderr[-3000:]}")
        results.append(json.loads(lines[-1].split(" ", 1)[1]))
    for result in results:
        if args.json:
            print(json.dumps(result))
            continue
        modules = result["modules"]
        print(f"{result['path']}: {len(modules)} midus modules ran functions "
              f"({len(result['imported'])} imported); exit {result['exit']}")
        print(f"  python -m midus {' '.join(Path(a).name if a.endswith('.yaml') else a for a in result['command'])}")
        for module, count in modules.items():
            print(f"  {module:<48} {count:>4} functions")
    if not args.json and len(results) == 2:
        union = set(results[0]["modules"]) | set(results[1]["modules"])
        print(f"both paths together: {len(union)} midus modules")


if __name__ == "__main__":
    main()
