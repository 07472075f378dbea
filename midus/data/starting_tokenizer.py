"""Which tokenizer a run's data uses when a model it starts from has one: ``data.tokenizer: auto``.

`fit` (`midus.training.cli.MidusCLI`) and `prepare` (`midus.data.prepare_command`) resolve the same
settings the same way, here: the starting model is ``model.pretrained`` or else
``model.upscale.base_checkpoint`` (a Hugging Face directory or a kit ``.ckpt``, which stores the
tokenizer its run trained with); ``auto`` takes its tokenizer, or trains a ``bpe`` when the run
starts from nothing. A new ``bpe``/``char`` on a Hugging Face model is refused: its embeddings know
the base's token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from midus.checkpoint import base_has_tokenizer

NEW_TOKENIZERS = ("bpe", "char")
"""``data.tokenizer`` kinds trained on the run's own text."""


@dataclass(frozen=True)
class StartingModel:
    """The model a run starts from, as its config names it (`field` empty: none)."""

    field: str = ""
    """``model.pretrained`` or ``model.upscale.base_checkpoint``."""
    path: str = ""
    made_by: str = ""
    """The command that writes `path` (``model.upscale.base_made_by``), quoted when it is missing."""

    @classmethod
    def of(cls, pretrained: str | None, base_checkpoint: str | None, base_made_by: str | None) -> StartingModel:
        """``model.pretrained`` wins over ``model.upscale.base_checkpoint`` (fit refuses both at once)."""
        if pretrained:
            return cls("model.pretrained", str(pretrained))
        if base_checkpoint:
            return cls("model.upscale.base_checkpoint", str(base_checkpoint), str(base_made_by or ""))
        return cls()

    @property
    def is_hugging_face(self) -> bool:
        """A pretrained Hugging Face model (``model.pretrained`` always is; a base when it is a directory)."""
        return self.field == "model.pretrained" or bool(self.path and Path(self.path).is_dir())


def refuse_a_new_tokenizer(kind: str, start: StartingModel) -> None:
    """One error when ``data.tokenizer`` would train a new tokenizer for a pretrained Hugging Face model."""
    if kind in NEW_TOKENIZERS and start.is_hugging_face:
        raise ValueError(
            f"data.tokenizer={kind} trains a new tokenizer, but {start.field}={start.path!r} is a pretrained model "
            "whose embeddings know its own tokenizer's ids; leave data.tokenizer at auto (the default: the base's "
            "tokenizer) or name one with data.tokenizer: hf and data.tokenizer_path"
        )


def resolve_tokenizer(kind: str, path: str, start: StartingModel) -> tuple[str, str]:
    """``(data.tokenizer, data.tokenizer_path)`` the data is built with: what the config says, except
    ``auto``: ``hf`` with `path` when set, else the starting model's own tokenizer, else ``bpe``.

    Raises:
        FileNotFoundError: ``auto`` and the starting model is missing.
        ValueError: ``auto`` and the starting model carries no tokenizer.
    """
    if kind != "auto":
        return kind, path
    if path:
        return "hf", path
    if not start.path:
        return "bpe", ""
    if not base_has_tokenizer(start.path, start.made_by, start.field):
        raise ValueError(
            f"data.tokenizer=auto takes the tokenizer of {start.field}={start.path!r}, which carries none (a kit "
            ".ckpt from before checkpoints stored it, or a directory without tokenizer files); name one with "
            "data.tokenizer: hf and data.tokenizer_path"
        )
    return "hf", start.path
