"""Where a base model comes from: a checkpoint of the kit's own ``fit``, or a Hugging Face directory.

The kit's `CausalLM` stores the resolved architecture of its model in every checkpoint
(``checkpoint["midus_model_config"]``), so an up-scaled model reloads without its base and
can itself be up-scaled again.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from midus.model.config import ModelConfig
from midus.model.transformer import MidusLM

MODEL_CONFIG_KEY = "midus_model_config"
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


def load_kit_checkpoint(path: Path, field_name: str = "checkpoint") -> MidusLM:
    """Rebuild the `MidusLM` of a Lightning checkpoint written by the kit's `CausalLM`."""
    try:
        # The config is a pickled dataclass, so this is not a weights-only load: only open
        # checkpoints you trust, as with any Lightning checkpoint.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(f"{field_name}: {str(path)!r} is not a readable checkpoint ({error})") from None
    config = checkpoint.get(MODEL_CONFIG_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict):
        raise ValueError(
            f"{field_name}: {str(path)!r} was not written by the kit's fit (it has no {MODEL_CONFIG_KEY!r}); "
            "give a kit .ckpt or a Hugging Face model directory"
        )
    state = {
        name[len(STATE_PREFIX):]: value for name, value in checkpoint.get("state_dict", {}).items()
        if name.startswith(STATE_PREFIX)
    }
    try:
        model = MidusLM(ModelConfig(**config))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field_name}: {str(path)!r} holds an invalid model config ({error})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{field_name}: {str(path)!r} does not match its own architecture "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model
