"""The model a run starts from: a kit ``.ckpt`` written by ``fit``, or a local Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from midus.checkpoint.hf_import import TOKENIZER_FILES, load_hf_checkpoint
from midus.checkpoint.kit import TOKENIZER_KEY, load_kit_checkpoint, read_kit_checkpoint
from midus.model.transformer import MidusLM


def base_location(path: str, made_by: str = "", field_name: str = "model.upscale.base_checkpoint") -> Path:
    """`path` as a Path, once something is there.

    Raises:
        FileNotFoundError: nothing at `path` (the message quotes `made_by`, the command that makes it).
    """
    location = Path(path)
    if not location.exists():
        hint = f"; it is made by: {made_by}" if made_by else ""
        raise FileNotFoundError(f"{field_name}: {path!r} does not exist{hint}")
    return location


def load_base(path: str, made_by: str = "", field_name: str = "model.upscale.base_checkpoint") -> MidusLM:
    """The model in `path`: a kit ``.ckpt`` file or a local Hugging Face directory.

    Raises:
        FileNotFoundError: nothing at `path` (the message quotes `made_by`, the command that makes it).
        ValueError: a file that is not a readable kit checkpoint, or a directory the Hugging Face
            import refuses (no weights, another architecture).
    """
    location = base_location(path, made_by, field_name)
    if location.is_dir():
        return load_hf_checkpoint(location)[0]
    return load_kit_checkpoint(location, field_name)


def base_has_tokenizer(path: str, made_by: str = "", field_name: str = "model.upscale.base_checkpoint") -> bool:
    """Whether the base in `path` carries its tokenizer: tokenizer files in a Hugging Face
    directory, or one stored in a kit ``.ckpt`` (every ``fit`` stores it; older files may not).
    Either way `midus.data.tokenizers.load_tokenizer_dir` reads it from `path`.

    Raises:
        FileNotFoundError: nothing at `path` (see `base_location`).
        ValueError: a file that is not a readable kit checkpoint.
    """
    location = base_location(path, made_by, field_name)
    if location.is_dir():
        return any((location / name).is_file() for name in TOKENIZER_FILES)
    return TOKENIZER_KEY in read_kit_checkpoint(location, field_name, mmap=True)
