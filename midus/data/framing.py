"""How a text becomes token ids "the way the tokenizer frames it", in one place.

A Hugging Face tokenizer called with ``add_special_tokens=True`` (its default) frames a text
with the special tokens its post-processor or its ``add_bos_token`` setting puts around it:
Llama-3's prepends ``<|begin_of_text|>``, the kit's own ``bpe`` / ``char`` tokenizers add
nothing. A model imported from the hub was trained on framed documents, so the kit frames
training documents, prompts and evaluation contexts the same way (issue 25: "BOS as the base
model saw it")::

    tokenizer(text, add_special_tokens=True)    [BOS] t1 t2 ... tn [EOS]?
    frame_documents(tokenizer, [text])          [BOS] t1 t2 ... tn            (trailing EOS dropped)
    packed stream (packing.pack_documents)      [BOS] doc1 EOS [BOS] doc2 EOS ...

The rule for a post-processor that also appends EOS (some BERT-style and T5-style
templates): that trailing EOS is dropped, so packing puts exactly one EOS between documents.
Whether the tokenizer appends it is decided once, by framing a probe text, not per document:
a document whose own text ends in the literal end-of-text string keeps that token. Any other
token the template appends (a ``[SEP]`` that is not the EOS) is part of the frame and kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

__all__ = ["Framing", "frame_documents", "frame_prompts", "framing_adds_tokens", "framing_of"]

_PROBE = "framing probe"
"""Ordinary text whose framed and unframed ids show what the tokenizer adds around a text."""


@dataclass(frozen=True)
class Framing:
    """The special tokens a tokenizer puts before (`prefix`) and after (`suffix`) every text."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    drops_trailing_eos: bool
    """Whether `suffix` ends with the EOS, which `frame_documents` drops."""

    @property
    def adds_tokens(self) -> bool:
        """Whether framing adds any token at all (False for the kit's bpe and char tokenizers)."""
        return bool(self.prefix or self.suffix)


def framing_of(tokenizer: PreTrainedTokenizerBase) -> Framing:
    """What `tokenizer` adds around a text when called with ``add_special_tokens=True``.

    Raises ValueError when the framed ids of a probe text do not contain its unframed ids as one
    run (a tokenizer whose special tokens change the text's own tokens), which no prefix/suffix
    rule can describe.
    """
    framed = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            prefix, suffix = tuple(framed[:start]), tuple(framed[start + len(plain) :])
            eos = tokenizer.eos_token_id
            return Framing(prefix, suffix, drops_trailing_eos=eos is not None and suffix[-1:] == (eos,))
    raise ValueError(
        f"tokenizer: {type(tokenizer).__name__} frames {_PROBE!r} as {framed}, which does not contain its "
        f"unframed ids {plain}; the kit cannot tell which tokens are the frame"
    )


def framing_adds_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer(text)`` differs from ``tokenizer(text, add_special_tokens=False)``
    (True for Llama-3's BOS-prepending tokenizer, False for the kit's bpe and char)."""
    return framing_of(tokenizer).adds_tokens


def frame_documents(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """The ids of each text as the tokenizer frames it (BOS where it puts one), without a trailing EOS.

    For tokenizers that add nothing (the kit's own) this equals
    ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` exactly.
    """
    if not texts:
        return []
    framing = framing_of(tokenizer)
    ids = tokenizer(list(texts), add_special_tokens=framing.adds_tokens)["input_ids"]
    if framing.drops_trailing_eos:
        ids = [row[:-1] for row in ids]
    return ids


def frame_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Each text framed as the start of a document, for a model to continue.

    A tokenizer that prepends a token (BOS) gives `frame_documents` as is; for one that adds
    none (the kit's bpe and char) the EOS goes first, since in a packed stream every document
    but the first follows an EOS. This is the lm-evaluation-harness's choice for an empty
    context too (``TemplateLM.loglikelihood``: ``prefix_token_id``, BOS or else EOS).
    """
    framing = framing_of(tokenizer)
    if framing.prefix:
        return frame_documents(tokenizer, texts)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: it adds no start token and has no eos_token to start a prompt with")
    return [[tokenizer.eos_token_id, *ids] for ids in frame_documents(tokenizer, texts)]
