"""Tiny stand-ins of real Hugging Face checkpoints, built offline inside a test.

`llama3_standin` writes what a Llama-3.2 directory holds, at toy size: a random `LlamaForCausalLM`
with llama3 RoPE scaling, tied embeddings and grouped-query attention, and a byte-level BPE whose
post-processor prepends ``<|begin_of_text|>`` as Llama-3's does (``tok(text)`` adds it,
``tok(text, add_special_tokens=False)`` does not; ../shared/docs/hf-notes.md). `write_parquet_shards`
writes text as parquet shards, as a web-text sample arrives.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"

STANDIN_TEXT = [
    f"Document {i}: the {animal} of {place} walked {steps} steps to the {thing} and slept there."
    for i, (animal, place, steps, thing) in enumerate(
        (a, p, s, t)
        for a in ("cat", "dog", "fox", "owl", "eel")
        for p in ("Paris", "Lima", "Oslo", "Kyiv")
        for s in ("three", "nine", "forty")
        for t in ("river", "market", "tower")
    )
]


def bos_tokenizer(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` that prepends BOS through its post-processor, like Llama-3's."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([texts], trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, model_input_names=["input_ids", "attention_mask"]
    )


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every tensor random (norm gains around 1), so a swapped or dropped name shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(
                1 + 0.3 * torch.randn_like(param) if name.endswith("norm.weight") else 0.1 * torch.randn_like(param)
            )
    return model


def llama3_standin(directory: Path, texts: list[str] | None = None, *, layers: int = 2, seed: int = 0,
                   vocab_size: int = 320) -> Path:
    """A random Llama-3.2-shaped checkpoint (llama3 RoPE scaling, tied embeddings, GQA) with a
    BOS-prepending tokenizer, saved to `directory` (returned). `vocab_size` exceeds the tokenizer's
    300 tokens, as real checkpoints pad their embeddings."""
    tokenizer = bos_tokenizer(texts or STANDIN_TEXT)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = randomised(LlamaForCausalLM(config).eval())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))
    return directory


def write_parquet_shards(directory: Path, texts: list[str], shards: int = 2) -> list[Path]:
    """`texts` as `shards` parquet files with a ``text`` column; returns their paths."""
    from datasets import Dataset

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = directory / f"shard-{shard:05d}.parquet"
        Dataset.from_dict({"text": texts[shard::shards]}).to_parquet(str(path))
        paths.append(path)
    return paths
