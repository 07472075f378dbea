"""Configuration keys that moved: one ``error:`` line naming the new place, instead of jsonargparse's
"unrecognized arguments" after a page of usage.

Checked in the command line (``--model.recall_probe_size 0``) and in every ``--config`` YAML file
given there, before anything is parsed or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MOVED_KEYS: dict[str, str] = {
    "model.recall_probe_size": "model.probes.recall_questions",
    "model.knowledge_bits_people": "model.probes.knowledge_bits_people",
    "model.memory_zeroed_eval": "model.probes.memory_zeroed",
}
"""Old dotted key -> where it lives now."""


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return []
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        keys += _dotted_keys(value, f"{dotted}.")
    return keys


def _config_files(args: list[str]) -> list[str]:
    files = []
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            files.append(args[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_moved_keys(args: list[str]) -> None:
    """Raise ValueError naming the first moved key found in `args` or its ``--config`` files."""
    for arg in args:
        key = arg.removeprefix("--").split("=", 1)[0]
        if arg.startswith("--") and key in MOVED_KEYS:
            raise ValueError(f"--{key} moved: it is --{MOVED_KEYS[key]} now")
    for file in _config_files(args):
        path = Path(file)
        if not path.is_file():
            continue  # the parser names a missing file itself
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue  # and a broken one
        for key in _dotted_keys(tree):
            # A config file holds one subcommand's config (model: …) or, rarely, several (fit: {model: …}).
            for candidate in (key, key.split(".", 1)[-1]):
                if candidate in MOVED_KEYS:
                    raise ValueError(f"{file}: {candidate} moved: it is {MOVED_KEYS[candidate]} now")
