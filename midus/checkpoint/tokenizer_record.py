"""A tokenizer as plain strings: how kit checkpoints carry the tokenizer they were trained with.

Strings only (the `tokenizers` JSON and the special tokens' text), so a checkpoint stays
loadable without unpickling tokenizer objects, and evaluation needs nothing but the file.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


def tokenizer_record(tokenizer: PreTrainedTokenizerBase) -> dict[str, str] | None:
    """The tokenizer as plain strings (stored in kit checkpoints); None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    record = {"tokenizer_json": backend.to_str()}
    for role in ("eos_token", "pad_token", "unk_token", "bos_token"):
        if getattr(tokenizer, role, None) is not None:
            record[role] = str(getattr(tokenizer, role))
    return record


def tokenizer_from_record(record: dict[str, str]) -> PreTrainedTokenizerFast:
    """The tokenizer `tokenizer_record` stored."""
    specials = {role: value for role, value in record.items() if role != "tokenizer_json"}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(record["tokenizer_json"]),
        model_input_names=["input_ids", "attention_mask"],
        **specials,
    )
