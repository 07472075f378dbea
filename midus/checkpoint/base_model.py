"""The model a run starts from: a kit ``.ckpt`` written by ``fit``, or a local Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from midus.checkpoint.hf_import import load_hf_checkpoint
from midus.checkpoint.kit import load_kit_checkpoint
from midus.model.transformer import MidusLM


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
        return load_hf_checkpoint(location)[0]
    return load_kit_checkpoint(location, field_name)
