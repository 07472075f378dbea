"""Reading checkpoint files as data: a weights-only `torch.load` with the kit's own plain types allowed.

A ``.ckpt`` is a pickle, and unpickling can run any code the file names. The kit therefore
reads every checkpoint with ``torch.load(weights_only=True)``: tensors, containers, numbers
and strings, plus the kit's configuration dataclasses (`KIT_TYPE_NAMES`), which hyperparameters
of checkpoints written outside the CLI (a plain ``Trainer``) hold. A file that needs anything
else is refused with one `CheckpointError` naming the file and what it holds, before any of
it is unpickled.

Trusted legacy files: with ``MIDUS_TRUST_CHECKPOINTS=1`` (`TRUST_ENV`) checkpoints are read
with full unpickling instead, by the kit and by Lightning's ``--ckpt_path`` loading alike.
"""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from midus.model.config import LayerSpec, ModelConfig
from midus.model.memory_config import MemoryConfig

TRUST_ENV = "MIDUS_TRUST_CHECKPOINTS"
"""Environment variable: ``1`` reads checkpoints with full unpickling (only for files you trust)."""

MOVED_MODULES = {
    "midus.training.data_module": "midus.data.sources",
    "midus.data.text_data": "midus.data.sources",
    "midus.probes.config": "midus.probes.validation",
}
"""Modules whose classes older checkpoints pickled (the data module's hyperparameters hold an
`EmbeddedCorpusConfig`; the probes' `ProbeConfig` had a module of its own) → where those classes live now."""

KIT_TYPE_NAMES = (
    "midus.model.config.ModelConfig",
    "midus.model.config.LayerSpec",
    "midus.model.memory_config.MemoryConfig",
    "midus.upscale.config.UpscaleConfig",
    "midus.data.sources.EmbeddedCorpusConfig",
    "midus.data.sources.FilesConfig",
    "midus.data.sources.HubConfig",
    "midus.data.sources.ShardsConfig",
    "midus.probes.validation.ProbeConfig",
    "midus.training.config.OptimizerConfig",
    "midus.training.config.ScheduleConfig",
    "midus.training.config.MemoryOptimizerConfig",
    "midus.training.config.ComputeConfig",
    "midus.training.config.GenerationConfig",
)
"""The kit's plain-data classes a checkpoint may hold, by the name pickle stores them under
(plus the old names of `MOVED_MODULES`)."""

_MODEL_TYPES: dict[str, type] = {
    "midus.model.config.ModelConfig": ModelConfig,
    "midus.model.config.LayerSpec": LayerSpec,
    "midus.model.memory_config.MemoryConfig": MemoryConfig,
}


class CheckpointError(ValueError):
    """A checkpoint file the kit cannot read as data: corrupt, truncated, foreign or unsafe."""


class _KitRecord:
    """Stands in, while unpickling, for a kit class whose module this process has not imported
    (the checkpoint layer never imports the layers above it); `_as_dicts` turns it into a dict."""


def trusted() -> bool:
    """Whether `TRUST_ENV` opts in to full unpickling of checkpoints."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _all_kit_names() -> dict[str, str]:
    """Every name a kit class may be pickled under → its current name."""
    names = {name: name for name in KIT_TYPE_NAMES}
    for old, new in MOVED_MODULES.items():
        moved = [current for current in KIT_TYPE_NAMES if current.startswith(new + ".")]
        names.update({current.replace(new, old, 1): current for current in moved})
    return names


def kit_safe_globals(stand_ins: bool = False) -> list[Any]:
    """The kit's classes as `torch.serialization.safe_globals` entries.

    A class of a layer above the checkpoint layer is taken from ``sys.modules`` (it is never
    imported here); when its module is not loaded it is left out, or with `stand_ins` replaced
    by a stand-in that the kit's reader turns into a dict of the object's fields.
    """
    entries: list[Any] = []
    for pickled, current in _all_kit_names().items():
        module, _, name = current.rpartition(".")
        cls = _MODEL_TYPES.get(current) or getattr(sys.modules.get(module), name, None)
        if cls is not None or stand_ins:
            entries.append((cls or _KitRecord, pickled))
    return entries


def _as_dicts(value: Any) -> Any:
    """`value` with every `_KitRecord` in it replaced by a dict of its fields (in place: the data is fresh)."""
    if isinstance(value, _KitRecord):
        return {key: _as_dicts(item) for key, item in vars(value).items()}
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _as_dicts(item)
    elif isinstance(value, list):
        value[:] = [_as_dicts(item) for item in value]
    elif type(value) is tuple:
        return tuple(_as_dicts(item) for item in value)
    return value


class _MovedModulesPickle:
    """A pickle module for a trusted `torch.load` that finds classes of `MOVED_MODULES` at their new home."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return super().find_class(MOVED_MODULES.get(module, module), name)

    load = pickle.load


def _reason(error: BaseException) -> str:
    """The informative line of a `torch.load` error (its weights-only messages run to a page)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "In PyTorch 2.6", "Please file an issue",
                   "(1)", "(2)", "WeightsUnpickler error")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    text = (useful or lines or [type(error).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def unsafe_advice(path: str | Path, field_name: str, names: list[str]) -> str:
    """The message refusing a checkpoint that needs arbitrary unpickling."""
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    return (
        f"{field_name}: {str(path)!r} holds objects only arbitrary unpickling can rebuild ({shown}), which could "
        f"run code; the kit reads checkpoints as data only. If you trust the file, set {TRUST_ENV}=1"
    )


def load_checkpoint_data(path: str | Path, field_name: str = "checkpoint", mmap: bool = False) -> Any:
    """What `torch.save` wrote to `path`, unpickled as data only (see the module docstring).

    `mmap` maps tensors from the file instead of reading them (a cheap check of a large file).

    Raises:
        FileNotFoundError: nothing at `path`.
        CheckpointError: a file that is not a `torch.save` checkpoint (corrupt, truncated,
            another format) or one that needs arbitrary unpickling; the message names `field_name` and `path`.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{field_name}: {str(path)!r} is not a file (expected a .ckpt written by fit)")
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as error:
        raise CheckpointError(f"{field_name}: {str(path)!r} cannot be read ({error.strerror or error})") from None
    if trusted():
        return _load(path, field_name, lambda: torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_MovedModulesPickle))
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{field_name}: {str(path)!r} is not a readable checkpoint (not a zip archive: corrupt, truncated "
            "or another format); expected a .ckpt written by fit"
        )
    allowed = kit_safe_globals(stand_ins=True)
    with torch.serialization.safe_globals(allowed):
        # A static scan of the pickle's globals, for a message naming them; the weights-only
        # load below is what keeps the file from running anything.
        unsafe = _load(path, field_name, lambda: torch.serialization.get_unsafe_globals_in_checkpoint(path))
        if unsafe:
            raise CheckpointError(unsafe_advice(path, field_name, unsafe))
        loaded = _load(path, field_name, lambda: torch.load(path, map_location="cpu", weights_only=True, mmap=mmap))
    return _as_dicts(loaded) if any(entry[0] is _KitRecord for entry in allowed) else loaded


def _load(path: str | Path, field_name: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except (RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError,
            AttributeError, ImportError, KeyError) as error:
        raise CheckpointError(
            f"{field_name}: {str(path)!r} is not a readable checkpoint ({_reason(error)}); "
            "expected a .ckpt written by fit"
        ) from None
