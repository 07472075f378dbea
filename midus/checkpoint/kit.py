"""The kit's checkpoint format: a Lightning ``.ckpt`` written by `CausalLM`, plus three entries.

* ``midus_model_config``: the resolved architecture (`ModelConfig` as plain data), so an
  up-scaled or imported model reloads without its base and can itself be up-scaled again;
* ``midus_tokenizer``: the training tokenizer as plain strings (`tokenizer_record`), so
  evaluation needs only the file.
* ``midus_training_progress``: tokens and sequences trained so far, so a resumed run's
  counts continue (written and read by `CausalLM`).

Model weights are the LightningModule's ``state_dict`` entries under ``model.``. Writing
(`kit_entries`) and reading (`read_kit_checkpoint`, `load_kit_checkpoint`) live here only.
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from midus.checkpoint.tokenizer_record import tokenizer_from_record, tokenizer_record
from midus.model.config import ModelConfig
from midus.model.transformer import MidusLM

MODEL_CONFIG_KEY = "midus_model_config"
TOKENIZER_KEY = "midus_tokenizer"
PROGRESS_KEY = "midus_training_progress"
"""Tokens and sequences trained since step 0, which `CausalLM` restores on resume."""
STATE_PREFIX = "model."

MOVED_MODULES = {"midus.training.data_module": "midus.data.text_data"}
"""Modules whose classes older checkpoints pickled (the data module's hyperparameters hold an
`EmbeddedCorpusConfig`) → where those classes live now."""


class _MovedModulesPickle:
    """A pickle module for `torch.load` that finds classes of `MOVED_MODULES` at their new home."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return super().find_class(MOVED_MODULES.get(module, module), name)

    load = pickle.load


def kit_entries(config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """The entries a kit checkpoint adds to Lightning's: the model config and, when it can be
    stored as strings, the tokenizer."""
    entries: dict[str, Any] = {MODEL_CONFIG_KEY: dataclasses.asdict(config)}
    record = tokenizer_record(tokenizer) if tokenizer is not None else None
    if record is not None:
        entries[TOKENIZER_KEY] = record
    return entries


def read_kit_checkpoint(path: str | Path, field_name: str = "checkpoint") -> dict:
    """The raw dictionary of a Lightning checkpoint written by the kit's `CausalLM`.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: a file that is not a checkpoint, or one not written by the kit.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{field_name}: {str(path)!r} is not a file (expected a .ckpt written by fit)")
    try:
        # The config is plain data, but older Lightning extras may not be: not a weights-only
        # load, so only open checkpoints you trust, as with any Lightning checkpoint.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_MovedModulesPickle)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(f"{field_name}: {str(path)!r} is not a readable checkpoint ({error})") from None
    if isinstance(checkpoint, dict) and dataclasses.is_dataclass(checkpoint.get(MODEL_CONFIG_KEY)):
        # Written while the config was stored as the dataclass itself (issue-4 runs).
        checkpoint[MODEL_CONFIG_KEY] = dataclasses.asdict(checkpoint[MODEL_CONFIG_KEY])
    if isinstance(checkpoint, dict) and not isinstance(checkpoint.get(MODEL_CONFIG_KEY), dict):
        legacy = _from_scratch_config(checkpoint)
        if legacy is not None:
            checkpoint[MODEL_CONFIG_KEY] = legacy
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(MODEL_CONFIG_KEY), dict):
        raise ValueError(
            f"{field_name}: {str(path)!r} was not written by the kit's fit (it has no {MODEL_CONFIG_KEY!r}); "
            "give a kit .ckpt or a Hugging Face model directory"
        )
    return checkpoint


def _from_scratch_config(checkpoint: dict) -> dict | None:
    """The model config of a checkpoint written before the kit stored it: a from-scratch run's
    hyperparameters hold it as given (an up-scaled or imported model's do not, so: None)."""
    hyper = checkpoint.get("hyper_parameters")
    if not isinstance(hyper, dict) or hyper.get("pretrained") or "upscale" in hyper:
        return None
    config = hyper.get("config")
    return config if isinstance(config, dict) and config.get("vocab_size") else None


def model_from_checkpoint(checkpoint: dict, path: str | Path, field_name: str = "checkpoint") -> MidusLM:
    """Rebuild the `MidusLM` of a checkpoint `read_kit_checkpoint` returned."""
    state = {
        name[len(STATE_PREFIX):]: value for name, value in checkpoint.get("state_dict", {}).items()
        if name.startswith(STATE_PREFIX)
    }
    try:
        model = MidusLM(ModelConfig(**checkpoint[MODEL_CONFIG_KEY]))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field_name}: {str(path)!r} holds an invalid model config ({error})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{field_name}: {str(path)!r} does not match its own architecture "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model


def checkpoint_tokenizer(checkpoint: dict) -> PreTrainedTokenizerFast | None:
    """The tokenizer stored in a kit checkpoint (None in checkpoints written before it was kept)."""
    record = checkpoint.get(TOKENIZER_KEY)
    return tokenizer_from_record(record) if isinstance(record, dict) else None


def load_kit_checkpoint(path: Path, field_name: str = "checkpoint") -> MidusLM:
    """Rebuild the `MidusLM` of a Lightning checkpoint written by the kit's `CausalLM`."""
    return model_from_checkpoint(read_kit_checkpoint(path, field_name), path, field_name)
