"""Where a base model comes from: a checkpoint of the kit's own ``fit``, or a Hugging Face directory.

The kit's `CausalLM` stores the resolved architecture of its model in every checkpoint
(``checkpoint["midus_model_config"]``), so an up-scaled model reloads without its base and
can itself be up-scaled again.
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from midus.model.config import ModelConfig
from midus.model.transformer import MidusLM
from midus.text.tokenizers import tokenizer_from_record

MODEL_CONFIG_KEY = "midus_model_config"
TOKENIZER_KEY = "midus_tokenizer"
STATE_PREFIX = "model."


def load_base(path: str, made_by: str = "", field_name: str = "model.upscale.base_checkpoint") -> MidusLM:
    """The model in `path`: a kit ``.ckpt`` file or a local Hugging Face directory.

    Raises:
        FileNotFoundError: nothing at `path` (the message quotes `made_by`, the command that makes it).
        ValueError: a file that is not a readable kit checkpoint, or a directory the Hugging Face
            import refuses (no weights, another architecture).
    """
    location = Path(path)
    if not location.exists():
        hint = f"; it is made by: {made_by}" if made_by else ""
        raise FileNotFoundError(f"{field_name}: {path!r} does not exist{hint}")
    if location.is_dir():
        from midus.hf_import import load_hf_checkpoint

        return load_hf_checkpoint(location)[0]
    return load_kit_checkpoint(location, field_name)


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
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
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
