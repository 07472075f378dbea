"""Tokenise documents and pack them into fixed-length training blocks.

Documents are joined with the end-of-text token and cut into rows of ``block_size + 1``
tokens (inputs are a row without its last token, targets without its first), so every
token of a block is trained on and no padding is needed.
"""

from __future__ import annotations

from datasets import Dataset
from transformers import PreTrainedTokenizerBase


def pack_documents(
    documents: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, split: str, num_proc: int = 1
) -> Dataset:
    """`documents` with a ``text`` column → dataset with an ``input_ids`` column of rows of block_size+1."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token (eos_token); documents could not be separated")
    row = block_size + 1

    def tokenize_and_chunk(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        stream: list[int] = []
        for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        usable = len(stream) - len(stream) % row
        return {"input_ids": [stream[i : i + row] for i in range(0, usable, row)]}

    # Large map batches lose at most one partial row each; small corpora fit in one batch.
    packed = documents.map(
        tokenize_and_chunk,
        batched=True,
        batch_size=2000,
        remove_columns=documents.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        desc=f"packing {split} into blocks of {block_size}",
    )
    if len(packed) == 0:
        total = sum(len(ids) + 1 for ids in tokenizer(documents[:]["text"], add_special_tokens=False)["input_ids"])
        raise ValueError(
            f"data.block_size={block_size}: the {split} split has {total} tokens, fewer than one block "
            f"of {row} (block_size + 1); lower data.block_size or add text"
        )
    return packed.with_format("torch")
