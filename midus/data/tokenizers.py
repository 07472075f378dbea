"""The three tokenizers the kit offers, all returned as `PreTrainedTokenizerFast`.

* ``bpe``: byte-level BPE trained with `tokenizers` on the training split, cached under the
  data cache keyed by corpus fingerprint and vocabulary size (training it twice is waste,
  and two runs of one experiment must share one vocabulary);
* ``char``: one token per character seen in the training split (for comparisons with
  character-level baselines), cached the same way;
* ``hf``: a local Hugging Face tokenizer directory (e.g. the checkpoint being continued).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from midus.checkpoint.hf_import import load_hf_tokenizer
from midus.checkpoint.kit import checkpoint_tokenizer, read_kit_checkpoint

END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"
TOKENIZER_KINDS = ("bpe", "char", "hf")


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    # model_input_names: without it transformers 4.x `generate` trips on token_type_ids.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=UNKNOWN,
        model_input_names=["input_ids", "attention_mask"],
    )


def train_bpe(batches: Iterable[list[str]], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) with `vocab_size` entries."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, UNKNOWN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(batches, trainer=trainer)
    return _wrap(tokenizer)


def train_char(batches: Iterable[list[str]]) -> PreTrainedTokenizerFast:
    """One token per distinct character of the texts, plus end-of-text and unknown."""
    alphabet = sorted(set().union(*(set(text) for batch in batches for text in batch)))
    vocab = {END_OF_TEXT: 0, UNKNOWN: 1}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    # Every character is its own pre-token; Fuse joins them back without separators.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer)


def same_vocabulary(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers give the same ids to the same tokens (added tokens included)."""
    return first.get_vocab() == second.get_vocab()


def load_tokenizer_dir(path: str | Path, field_name: str) -> PreTrainedTokenizerBase:
    """A tokenizer saved with `save_pretrained` in a local directory, or the one stored in a kit
    ``.ckpt`` file (every checkpoint of ``fit`` carries its tokenizer); errors name `field_name`."""
    if Path(path).is_file():
        tokenizer = checkpoint_tokenizer(read_kit_checkpoint(path, field_name))
        if tokenizer is None:
            raise ValueError(
                f"{field_name}: checkpoint {str(path)!r} stores no tokenizer (written before the kit kept one)"
            )
        return tokenizer

    try:
        return load_hf_tokenizer(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{field_name}: {error}") from error
    except (OSError, ValueError) as error:
        raise ValueError(f"{field_name}: {str(path)!r} holds no loadable Hugging Face tokenizer: {error}") from error


def cached_tokenizer(
    kind: str,
    batches: Iterable[list[str]],
    vocab_size: int,
    cache_dir: str | Path,
    corpus_key: str,
) -> PreTrainedTokenizerFast:
    """Load the ``bpe``/``char`` tokenizer of this corpus from the cache, training it if absent."""
    name = f"{corpus_key}-bpe{vocab_size}" if kind == "bpe" else f"{corpus_key}-char"
    directory = Path(cache_dir) / "tokenizers" / name
    if (directory / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    tokenizer = train_bpe(batches, vocab_size) if kind == "bpe" else train_char(batches)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
