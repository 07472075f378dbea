"""The prepared text of a run: text → tokenizer → packed blocks → loaders, plus the recall probe.

Everything is prepared at construction: the vocabulary size must exist before the model is
built (the CLI links ``data.vocab_size`` into ``model.config.vocab_size``), and bad input
must fail before the Trainer writes a run directory.

`TextData` is plain Python (the analyses use it, and so their ``--help`` needs no Lightning);
`midus.data.datamodule.LanguageModelingData` is the same class as a LightningDataModule.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from midus.data.corpus import BiographyCorpus, RecallItem
from midus.data.embedded_splits import embedded_key, embedded_splits, shared_names
from midus.data.file_and_hub_splits import file_splits, hub_splits
from midus.data.packing import cached_blocks
from midus.data.prepare import prepare_shards
from midus.data.recall_probe import TokenizedQuestion, tokenize_probe
from midus.data.resumable_loader import EpochShuffleSampler, ResumableLoader, ShardSampler
from midus.data.sources import EmbeddedCorpusConfig, FilesConfig, HubConfig, ShardsConfig
from midus.data.streamed_text import streamed_embedded, streamed_files, streamed_hub
from midus.data.token_shards import TokenBlocks
from midus.data.tokenizers import cached_tokenizer, load_tokenizer_dir

log = logging.getLogger(__name__)


def _shard_blocks(directory: Path, split: str, name: str, block_size: int) -> TokenBlocks:
    """The blocks of a prepared split; a split shorter than one block is refused as packing refuses it."""
    blocks = TokenBlocks(directory, split, block_size)
    if len(blocks) == 0:
        raise ValueError(
            f"data.block_size={block_size}: the {name} split has {blocks.tokens} tokens, fewer than one block "
            f"of {block_size + 1} (block_size + 1); lower data.block_size or add text"
        )
    return blocks


class TextData:
    """Packed causal-LM blocks from the embedded corpus, local files, or a Hugging Face dataset.

    Args:
        source: which source the text comes from: ``embedded`` (generated biographies),
            ``files`` (local .txt/.jsonl/.parquet) or ``hub`` (a dataset name or local dataset
            directory for `datasets.load_dataset`); its settings are the group of that name.
        embedded: settings of the embedded corpus (`midus.data.sources.EmbeddedCorpusConfig`).
        files: local files, their validation split and how they become records
            (`midus.data.sources.FilesConfig`).
        hub: a Hugging Face dataset, its splits and text column (`midus.data.sources.HubConfig`).
        tokenizer: ``auto`` (the default): `tokenizer_path` when set, else the starting model's
            own tokenizer (``python -m midus`` resolves it from ``model.pretrained`` or
            ``model.upscale.base_checkpoint``, a Hugging Face directory or kit ``.ckpt``, and
            from a ``--ckpt_path`` of a run that had one), else a ``bpe`` trained on the
            training split; ``bpe``, ``char`` (one token per character) or ``hf`` (`tokenizer_path`)
            ask for one kind. A new ``bpe``/``char`` on a pretrained model is refused: its
            embeddings know the base's token ids, not new ones.
        bpe_vocab_size: vocabulary size of the trained BPE.
        tokenizer_path: local Hugging Face tokenizer directory (tokenizer=hf).
        block_size: tokens per training sequence.
        batch_size: sequences per batch.
        num_workers: DataLoader worker processes.
        cache_dir: where tokenizers and prepared corpora are cached.
        predict_prompts: prompts that ``predict`` continues; empty uses the first recall-probe
            prompts of the embedded corpus.
        format: how the tokenised text is kept. ``blocks`` (the default): packed blocks of
            `block_size` in the data cache (`midus.data.packing`), prepared in one process from
            text converted into `datasets`' cache. ``shards``: token shards prepared once
            (`midus.data.prepare`; ``python -m midus prepare`` or the first run that needs them):
            the text streamed (local files record by record, hub datasets with ``streaming=True``),
            tokenised in ``shards.num_proc`` processes up to ``shards.max_tokens``, one flat
            uint16/uint32 copy of the token ids, read as blocks of any `block_size`, resumable when
            interrupted. Without validation text of the source's own (``files.val``,
            ``hub.val_split``), ``shards`` holds out every record that raises
            ceil(records * val_fraction) instead of a seeded shuffle.
        shards: where the token shards go, how much text, how many processes (format=shards;
            `midus.data.sources.ShardsConfig`).
    """

    def __init__(
        self,
        source: Literal["embedded", "files", "hub"] = "embedded",
        embedded: EmbeddedCorpusConfig = EmbeddedCorpusConfig(),
        files: FilesConfig = FilesConfig(),
        hub: HubConfig = HubConfig(),
        tokenizer: Literal["auto", "bpe", "char", "hf"] = "auto",
        bpe_vocab_size: int = 2048,
        tokenizer_path: str = "",
        block_size: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str = "data",
        predict_prompts: list[str] = [],
        format: Literal["blocks", "shards"] = "blocks",
        shards: ShardsConfig = ShardsConfig(),
    ) -> None:
        super().__init__()  # cooperative: the LightningDataModule's __init__ in LanguageModelingData
        self.settings = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        # Every epoch's order derives from it (resumable, identical on every process).
        self.shuffle_seed = torch.initial_seed() % 2**63
        self._keep_settings()
        if block_size < 1:
            raise ValueError(f"data.block_size must be >= 1, got {block_size}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        shards.check_format(format)
        if tokenizer == "auto":  # nothing resolved it to the starting model's (TextData knows no model)
            tokenizer = "hf" if tokenizer_path else "bpe"
        if tokenizer == "hf" and not tokenizer_path:
            raise ValueError("data.tokenizer=hf needs data.tokenizer_path (a local tokenizer directory)")
        if tokenizer == "bpe" and bpe_vocab_size < 260:
            raise ValueError(f"data.bpe_vocab_size must be >= 260 (256 bytes + specials), got {bpe_vocab_size}")
        # The tokenizer directory is checked before any text is loaded or tokenizer trained.
        hf_tokenizer = load_tokenizer_dir(tokenizer_path, "data.tokenizer_path") if tokenizer == "hf" else None

        self.corpus: BiographyCorpus | None = None
        # The replay population (embedded.replay_seed), and main people dropped for sharing a name with it.
        self.replay_corpus: BiographyCorpus | None = None
        self.dropped_people: frozenset[str] = frozenset()
        if source == "embedded":
            replay_people = embedded.replay_people
            self.corpus = BiographyCorpus(embedded.seed, embedded.num_people, embedded.docs_per_person)
            if replay_people:
                self.replay_corpus = BiographyCorpus(
                    embedded.replay_seed, replay_people, embedded.replay_docs_per_person or embedded.docs_per_person
                )
                self.dropped_people = frozenset(shared_names(self.corpus, self.replay_corpus))
                if self.dropped_people:
                    log.warning(
                        "data.embedded: %d people of population %d share a name with replay population %d and are "
                        "left out of population %d: %s", len(self.dropped_people), embedded.seed,
                        embedded.replay_seed, embedded.seed, sorted(self.dropped_people),
                    )
            splits = embedded_splits(self.corpus, self.replay_corpus, embedded.replay_share, embedded.replay_validation)
            corpus_key = embedded_key(
                embedded.seed, embedded.num_people, embedded.docs_per_person,
                embedded.replay_seed, replay_people, embedded.replay_share,
                embedded.replay_docs_per_person, embedded.replay_validation,
            )
        elif format == "shards":  # read as streams when the shards are prepared (nothing converted here)
            streamed = (
                streamed_files(
                    files.train, files.val, files.val_fraction, files.text_field, files.sample_by, files.seed
                )
                if source == "files"
                else streamed_hub(
                    hub.dataset, hub.config, hub.train_split, hub.val_split, hub.val_fraction, hub.text_field
                )
            )
            corpus_key = streamed.key
        elif source == "files":
            splits, corpus_key = file_splits(
                files.train, files.val, files.val_fraction, files.text_field, files.sample_by, cache_dir, files.seed
            )
        else:
            splits, corpus_key = hub_splits(
                hub.dataset, hub.config, hub.train_split, hub.val_split, hub.val_fraction, hub.text_field, cache_dir,
                hub.seed,
            )

        self.prepared_dir: Path | None = None
        """The token shards' directory (format=shards), None for packed blocks."""
        if format == "shards":
            if source == "embedded":
                streamed = streamed_embedded(splits, corpus_key)
            self.tokenizer, self.prepared_dir = prepare_shards(
                streamed, tokenizer, hf_tokenizer, bpe_vocab_size, cache_dir, shards.directory, shards.max_tokens,
                shards.num_proc, shards.tokens_per_shard,
            )
            self.train_blocks, self.val_blocks = (
                _shard_blocks(self.prepared_dir, split, name, block_size)
                for split, name in (("train", "training"), ("validation", "validation"))
            )
        else:
            # One process prepares, any other waiting (several processes of one run, or two runs
            # sharing the cache) then reads what it wrote: tokenizer training and packing happen once.
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            with FileLock(str(Path(cache_dir) / f".{corpus_key}.lock")):
                self.tokenizer: PreTrainedTokenizerBase = hf_tokenizer or cached_tokenizer(
                    tokenizer, (batch["text"] for batch in splits["train"].iter(batch_size=1000)), bpe_vocab_size,
                    cache_dir, corpus_key,
                )
                self.train_blocks, self.val_blocks = (
                    cached_blocks(splits[split], self.tokenizer, block_size, name, cache_dir, corpus_key)
                    for split, name in (("train", "training"), ("validation", "validation"))
                )
        # Recall probe by population and prompt phrasing: "train" asks the main population in a
        # phrasing seen in training (stored facts), "heldout" in held-out phrasing (facts
        # transferred to new wording); "replay" and "replay_heldout" ask the replay population
        # the same ways (phrasing seen in that population's full training documents).
        probes = ("train", "heldout") if self.corpus else ()
        probes += ("replay", "replay_heldout") if self.replay_corpus else ()
        self.recall_questions: dict[str, list[TokenizedQuestion]] = {
            phrasing: tokenize_probe(self._probe_items(phrasing), self.tokenizer) for phrasing in probes
        }
        log.info(
            "data: %s, vocabulary %d, %d training and %d validation blocks of %d tokens",
            corpus_key, self.vocab_size, len(self.train_blocks), len(self.val_blocks), block_size,
        )

    def _keep_settings(self) -> None:
        """Called by the constructor: where else its arguments are recorded (Lightning: hparams)."""

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary, added tokens included (linked into the model)."""
        return len(self.tokenizer)

    def processes(self) -> tuple[int, int]:
        """(number of processes, this one's rank) sharing the data; one outside a distributed run."""
        return 1, 0

    def train_dataloader(self) -> DataLoader:
        """Shuffled blocks of this process, reshuffled per epoch, resumable mid-epoch (`ResumableLoader`)."""
        replicas, rank = self.processes()
        batch_size = self.settings["batch_size"]
        sampler = EpochShuffleSampler(self.train_blocks, replicas, rank, self.shuffle_seed)
        # A split smaller than one batch still trains, on one short batch per epoch.
        return ResumableLoader(
            self.train_blocks, sampler, batch_size, drop_last=sampler.num_samples >= batch_size,
            num_workers=self.settings["num_workers"],
        )

    def val_dataloader(self) -> DataLoader:
        """The validation blocks in order; each process scores its own share, none twice."""
        replicas, rank = self.processes()
        return DataLoader(
            self.val_blocks,
            batch_size=self.settings["batch_size"],
            sampler=ShardSampler(self.val_blocks, replicas, rank),
            num_workers=self.settings["num_workers"],
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """One prompt per batch (prompts differ in length and the model takes no padding)."""
        prompts = self.settings["predict_prompts"] or [item.prompt for item in self._probe_items()[:8]]
        if not prompts:
            raise ValueError("data.predict_prompts is empty and the data source has no recall probe to borrow from")
        from midus.data.framing import frame_prompts

        # A document start as packing frames it: BOS where the tokenizer puts one, else EOS.
        encoded = [{"input_ids": torch.tensor(ids)} for ids in frame_prompts(self.tokenizer, prompts)]
        return DataLoader(encoded, batch_size=1)

    def population_blocks(self, population: Literal["new", "background"], count: int) -> torch.Tensor | None:
        """Up to `count` blocks (rows of ``block_size + 1`` token ids) of one population's text alone.

        ``new``: the embedded corpus's main population packed on its own (other sources: the training
        blocks); ``background``: the replay population's documents, all of them (the base's own
        text), None without a replay population. The blocks are a sample drawn with a generator of
        their own, seeded by the run's seed: the training loader's order and position and the global
        random state stay untouched (sparse memory finetuning counts memory reads on them).
        """
        if population == "background" and self.replay_corpus is None:
            return None
        if population == "new" and self.corpus is None:
            blocks = self.train_blocks
        else:
            from datasets import Dataset

            from midus.data.packing import pack_documents

            if population == "new":
                kept = [0 if person.name in self.dropped_people else self.corpus.docs_per_person
                        for person in self.corpus.people]
                documents = self.corpus.train_documents(kept)
            else:
                documents = self.replay_corpus.train_documents()
            blocks = pack_documents(
                Dataset.from_dict({"text": documents}), self.tokenizer, self.settings["block_size"], population
            )
        generator = torch.Generator().manual_seed(self.shuffle_seed + (population == "background"))
        chosen = torch.randperm(len(blocks), generator=generator)[:count].tolist()
        return blocks[chosen]["input_ids"]

    def _probe_items(self, phrasing: str = "train") -> list[RecallItem]:
        """Probe items of a `recall_questions` key: train, heldout, replay or replay_heldout."""
        if phrasing.startswith("replay"):
            if self.replay_corpus is None:
                return []
            return self.replay_corpus.recall_probe("heldout" if phrasing == "replay_heldout" else "train")
        if self.corpus is None:
            return []
        return [item for item in self.corpus.recall_probe(phrasing) if item.person not in self.dropped_people]
