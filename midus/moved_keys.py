"""Configuration keys that moved, in one table, and how every reader of a config deals with them.

* Given by the user (a command-line flag, a ``--config`` YAML, an ablation arm's overrides and
  tuning candidates): one ``error:`` line naming the new place (`check_moved_keys`), before
  anything is parsed or written, instead of jsonargparse's "unrecognized arguments" after a page
  of usage. ``python -m midus`` checks `MOVED_KEYS`; the analyses and ``prepare``, which read a
  data section alone, check `MOVED_DATA_KEYS`.
* Written by the kit before the move (a run's ``config.yaml``, an ablation arm's
  ``arm_config.yaml``, a checkpoint's hyperparameters): moved to the new place when read
  (`upgrade_config`), so old runs still resume, skip and analyse.

The tables are plain dotted paths, old -> new; this module imports nothing of the kit, so every
layer that reads configs can use it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

SOURCE = "<source>"
"""In a new place: the section named by ``data.source`` (``files`` or ``hub``, the sources that read it)."""
SOURCES_WITH_RECORDS = ("files", "hub")

MOVED_DATA_KEYS: dict[str, str] = {
    "data.train_files": "data.files.train",
    "data.val_files": "data.files.val",
    "data.text_sample_by": "data.files.sample_by",
    "data.hub_dataset": "data.hub.dataset",
    "data.hub_config": "data.hub.config",
    "data.hub_train_split": "data.hub.train_split",
    "data.hub_val_split": "data.hub.val_split",
    "data.val_fraction": f"data.{SOURCE}.val_fraction",
    "data.text_field": f"data.{SOURCE}.text_field",
    "data.seed": f"data.{SOURCE}.seed",
    "data.prepared_dir": "data.shards.directory",
    "data.max_tokens": "data.shards.max_tokens",
    "data.num_proc": "data.shards.num_proc",
    "data.shard_tokens": "data.shards.tokens_per_shard",
}
"""Old dotted ``data.*`` key -> where it lives now (`SOURCE`: in the group of the source that reads it)."""

MOVED_MODEL_KEYS: dict[str, str] = {
    # Issue 21: the validation probes' settings in model.probes.
    "model.recall_probe_size": "model.probes.recall_questions",
    "model.knowledge_bits_people": "model.probes.knowledge_bits_people",
    "model.memory_zeroed_eval": "model.probes.memory_zeroed",
    # Issue 28: CausalLM's knobs in groups (midus.training.config).
    "model.learning_rate": "model.optimizer.learning_rate",
    "model.weight_decay": "model.optimizer.weight_decay",
    "model.betas": "model.optimizer.betas",
    "model.fused_adamw": "model.optimizer.fused",
    "model.warmup_steps": "model.schedule.warmup_steps",
    "model.min_lr_ratio": "model.schedule.min_lr_ratio",
    "model.memory_lr": "model.memory_optimizer.learning_rate",
    "model.memory_lr_keys": "model.memory_optimizer.subkeys",
    "model.memory_lr_schedule": "model.memory_optimizer.schedule",
    "model.compile": "model.compute.compile",
    "model.activation_checkpointing": "model.compute.activation_checkpointing",
    "model.loss_chunk_tokens": "model.compute.loss_chunk_tokens",
    "model.max_new_tokens": "model.generation.max_new_tokens",
    "model.temperature": "model.generation.temperature",
}
"""Old dotted ``model.*`` key -> where it lives now."""

MOVED_KEYS: dict[str, str] = {**MOVED_MODEL_KEYS, **MOVED_DATA_KEYS}
"""Every old dotted key -> where it lives now."""

Table = Mapping[str, str]


def new_place(key: str, table: Table, flag: str = "") -> str:
    """Where the moved `key` lives now, as an error names it (`flag`: ``--`` before each key)."""
    new = table[key]
    if SOURCE not in new:
        return f"{flag}{new}"
    places = " or ".join(f"{flag}{new.replace(SOURCE, source)}" for source in SOURCES_WITH_RECORDS)
    return f"{places} (the group of data.source)"


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    """Every key of a nested mapping as a dotted path; a list of strings under ``keep`` (an ablation's
    ``tune.keep.<arm>``: dotted keys) counts as keys below its own."""
    if isinstance(tree, list) and prefix.rstrip(".").rsplit(".", 2)[-2:-1] == ["keep"]:
        return [f"{prefix}{item}" for item in tree if isinstance(item, str)]
    if not isinstance(tree, dict):
        return []
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        keys += _dotted_keys(value, f"{dotted}.")
    return keys


def moved_keys_in(tree: Any, table: Table, prefix: str = "") -> list[tuple[str, str]]:
    """``(where, old key)`` of every moved key in a config mapping (the section at dotted `prefix`),
    wherever a config holds one: at the top (``model: …``), under a subcommand (``fit: {model: …}``),
    in an ablation's arms and tuning (``ablation.arms.<arm>.model.…``, dotted or nested, and the
    keys listed in ``ablation.tune.keep``); `where` is the path above the key ("" at the top)."""
    found = []
    for dotted in _dotted_keys(tree, prefix):
        parts = dotted.split(".")
        for start in range(len(parts)):
            if ".".join(parts[start:]) in table:
                found.append((".".join(parts[:start]), ".".join(parts[start:])))
                break
    return found


def check_config(tree: Any, table: Table, source: str, prefix: str = "") -> None:
    """Raise ValueError naming the moved keys of `tree` (read from `source`, a file or a flag): the first
    in full, and in the same line every other one with its new place (a run's saved config.yaml from
    before the move holds them all)."""
    found = moved_keys_in(tree, table, prefix)
    if not found:
        return
    (where, key), others = found[0], found[1:]
    inside = f" (in {where})" if where else ""
    message = f"{source}: {key}{inside} moved: it is {new_place(key, table)} now"
    if others:
        message += "; also moved: " + ", ".join(f"{old} -> {new_place(old, table)}" for _, old in others)
    raise ValueError(message)


def _flag_value(args: list[str], index: int) -> tuple[str, str | None]:
    """``(name, value)`` of the flag at ``args[index]`` (``--name=value`` or ``--name value``)."""
    name, equals, value = args[index].removeprefix("--").partition("=")
    if equals:
        return name, value
    return name, args[index + 1] if index + 1 < len(args) else None


def _yaml_mapping(text: str | None) -> dict | None:
    """`text` read as a YAML file (when it names one) or as YAML itself; None unless a mapping."""
    if text is None:
        return None
    try:
        path = Path(text)
        is_file = path.is_file()
    except (OSError, ValueError):  # a YAML string too long or odd for a path
        is_file = False
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8") if is_file else text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # the parser names a missing or broken file itself
    return tree if isinstance(tree, dict) else None


def check_moved_keys(args: list[str], table: Table) -> None:
    """Raise ValueError naming the first moved key of `table` in `args`: a flag (``--model.memory_lr``),
    a ``--config`` YAML (a file or YAML text), or a section given whole (``--data '{seed: 1}'``)."""
    sections = {key.split(".", 1)[0] for key in table}
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, value = _flag_value(args, index)
        if name in table:
            raise ValueError(f"--{name} moved: it is {new_place(name, table, '--')} now")
        if name == "config":
            check_config(_yaml_mapping(value), table, value if value and "\n" not in value else "--config")
        elif name in sections:
            check_config(_yaml_mapping(value), table, f"--{name}", f"{name}.")


def _pop(tree: dict, dotted: str) -> tuple[bool, Any]:
    parts = dotted.split(".")
    for part in parts[:-1]:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return False, None
    if parts[-1] not in tree:
        return False, None
    return True, tree.pop(parts[-1])


def _put(tree: dict, dotted: str, value: Any) -> None:
    """Set `dotted` in `tree` unless it holds a value already (a config with both keeps the new one)."""
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree.setdefault(parts[-1], value)


def upgrade_config(tree: dict, table: Table, prefix: str = "") -> dict:
    """A copy of the config mapping `tree` (the section at dotted `prefix`: ``""`` for a whole config,
    ``"model."`` for a checkpoint's hyperparameters, ``"data."`` for a data section) with every moved
    key of `table` at its new place. A key whose new place is `SOURCE`'s goes to the group of the
    config's ``data.source`` and is dropped for a source that never read it (the embedded corpus)."""
    upgraded = copy.deepcopy(tree)
    for old, new in table.items():
        if not old.startswith(prefix):
            continue
        found, value = _pop(upgraded, old[len(prefix):])
        if not found:
            continue
        if SOURCE in new:
            data = upgraded if prefix == "data." else upgraded.get("data") or {}
            source = data.get("source", "embedded") if isinstance(data, dict) else "embedded"
            if source not in SOURCES_WITH_RECORDS:
                continue
            new = new.replace(SOURCE, source)
        _put(upgraded, new[len(prefix):] if new.startswith(prefix) else new, value)
    return upgraded
