"""The prepared text of a run: text → tokenizer → packed blocks → loaders, plus the recall probe.

Everything is prepared at construction: the vocabulary size must exist before the model is
built (the CLI links ``data.vocab_size`` into ``model.config.vocab_size``), and bad input
must fail before the Trainer writes a run directory.

`TextData` is plain Python (the analyses use it, and so their ``--help`` needs no Lightning);
`midus.data.datamodule.LanguageModelingData` is the same class as a LightningDataModule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from midus.data.corpus import BiographyCorpus, RecallItem
from midus.data.corpus.names import NAME_SPACE_SIZE
from midus.data.embedded_splits import embedded_key, embedded_splits, shared_names
from midus.data.file_and_hub_splits import file_splits, hub_splits
from midus.data.packing import cached_blocks
from midus.data.prepare import prepare_shards
from midus.data.recall_probe import TokenizedQuestion, tokenize_probe
from midus.data.resumable_loader import EpochShuffleSampler, ResumableLoader, ShardSampler
from midus.data.streamed_text import streamed_embedded, streamed_files, streamed_hub
from midus.data.token_shards import TokenBlocks
from midus.data.tokenizers import cached_tokenizer, load_tokenizer_dir

log = logging.getLogger(__name__)


@dataclass
class EmbeddedCorpusConfig:
    """The generated biography corpus (see `midus.data.corpus.BiographyCorpus`), optionally with a
    second, replayed population (continued training: new people plus a share of the old)."""

    seed: int = 0
    """Population seed: names and facts are a pure function of it (a new seed, a new population).
    With replay this is the main (new) population, probed as val/recall_acc[_heldout]."""
    num_people: int = 200
    """Population size."""
    docs_per_person: int = 24
    """Training biographies per person, each with fresh template choices and sentence order
    (many renderings make a small model store facts instead of memorising documents)."""
    replay_seed: int = -1
    """Seed of a second population mixed into training for replay, e.g. the one a base model was
    pretrained on (-1: none). It is generated with docs_per_person: when replay_num_people and
    docs_per_person equal the base run's num_people and docs_per_person, its documents and
    probe prompts are exactly the base run's. Probed as val/recall_acc_replay[_heldout];
    validation text holds the held-out biographies of both populations."""
    replay_num_people: int = 0
    """Size of the replay population (0: the same as num_people)."""
    replay_docs_per_person: int = 0
    """Training biographies per person the replay population is generated with (0: the same as
    docs_per_person). Set it to the base run's docs_per_person when the new population has fewer
    renderings per person than the base's had: the replay documents are then still exactly the
    base run's (its first renderings of each person, in the order they were drawn)."""
    replay_validation: bool = True
    """Whether validation text holds the replay population's held-out biographies after the new
    population's (val/loss covers both). False scores the new population's alone: a tuning run
    then never reads the text a reported run's val/loss reads for the replay population. The
    replay probes (val/recall_acc_replay*) run either way."""
    replay_share: float = 0.25
    """Share of the training documents that come from the replay population, in (0, 1); the rest
    are all documents of population seed. Replay documents are a fixed subset of the replay
    population's: R = round(share / (1 - share) * main documents), each replay person keeping
    its first R // people renderings (the first R % people people in population order one
    more), so every replay person keeps at least one and at most docs_per_person. A person of
    population seed whose name also occurs in the replay population is dropped from population
    seed (text and probe; the replay population stays whole)."""


def _replay_people(embedded: EmbeddedCorpusConfig) -> int:
    """Checked size of the replay population; 0 when there is none."""
    if embedded.replay_seed < -1:
        raise ValueError(f"data.embedded.replay_seed must be >= 0, or -1 for no replay, got {embedded.replay_seed}")
    if embedded.replay_seed == -1:
        return 0
    if embedded.replay_seed == embedded.seed:
        raise ValueError(
            f"data.embedded.replay_seed={embedded.replay_seed} equals data.embedded.seed: the replay population "
            "must be a different population (another seed)"
        )
    if not 0.0 < embedded.replay_share < 1.0:
        raise ValueError(f"data.embedded.replay_share must be in (0, 1) with replay, got {embedded.replay_share}")
    if embedded.replay_docs_per_person < 0:
        raise ValueError(
            "data.embedded.replay_docs_per_person must be 0 (= docs_per_person) or >= 1, "
            f"got {embedded.replay_docs_per_person}"
        )
    if not 0 <= embedded.replay_num_people <= NAME_SPACE_SIZE:
        raise ValueError(
            f"data.embedded.replay_num_people must be 0 (= num_people) or in [1, {NAME_SPACE_SIZE}], "
            f"got {embedded.replay_num_people}"
        )
    return embedded.replay_num_people or embedded.num_people


SHARD_SETTINGS = {"prepared_dir": "", "max_tokens": 0, "num_proc": 0, "shard_tokens": 1 << 26}
"""Settings of ``data.format: shards`` and their defaults (another value needs that format)."""


def _check_shard_settings(
    data_format: str, prepared_dir: str, max_tokens: int, num_proc: int, shard_tokens: int
) -> None:
    """Refuse a shard setting given for packed blocks (it would do nothing) or out of range."""
    given = {"prepared_dir": prepared_dir, "max_tokens": max_tokens, "num_proc": num_proc, "shard_tokens": shard_tokens}
    if data_format != "shards":
        for name, value in given.items():
            if value != SHARD_SETTINGS[name]:
                raise ValueError(
                    f"data.{name}={value!r} applies to token shards; set data.format: shards as well "
                    f"(data.format is {data_format})"
                )
    for name in ("max_tokens", "num_proc"):
        if given[name] < 0:
            raise ValueError(f"data.{name} must be >= 0 (0: {'all' if name == 'max_tokens' else 'one per core'}), "
                             f"got {given[name]}")
    if shard_tokens < 1:
        raise ValueError(f"data.shard_tokens must be >= 1, got {shard_tokens}")


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
        source: ``embedded`` (generated biographies), ``files`` (local .txt/.jsonl/.parquet)
            or ``hub`` (a dataset name or local dataset directory for `datasets.load_dataset`).
        embedded: settings of the embedded corpus (source=embedded).
        train_files: paths or globs of training files (source=files).
        val_files: paths or globs of validation files; empty splits off `val_fraction`.
        val_fraction: share of training records held out when no validation split exists.
        text_sample_by: how .txt files become records: per ``line``; per ``paragraph`` (runs
            of lines between blank lines, whitespace-only lines counting as blank); per
            ``article`` (a WikiText ``= Title =`` heading starts one, as lm-evaluation-harness's
            wikitext pages); or per ``document`` (a whole file). A record over
            `midus.data.text_records.MAX_RECORD_CHARS` (1,000,000) characters is an error (a warning
            for ``document``). .jsonl/.parquet records are unaffected.
        hub_dataset: dataset name for `datasets.load_dataset` (source=hub).
        hub_config: dataset configuration name ("" for the default).
        hub_train_split: split used for training.
        hub_val_split: split used for validation ("" or absent: split off `val_fraction`).
        text_field: column holding the text (.jsonl, .parquet, hub datasets).
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
        seed: seed of the validation split-off. The training order's shuffle seed is the run's
            global seed (``seed_everything``) at construction, so seeds vary the data order.
        predict_prompts: prompts that ``predict`` continues; empty uses the first recall-probe
            prompts of the embedded corpus.
        format: how the tokenised text is kept. ``blocks`` (the default): packed blocks of
            `block_size` in the data cache (`midus.data.packing`), prepared in one process from
            text converted into `datasets`' cache. ``shards``: token shards prepared once
            (`midus.data.prepare`; ``python -m midus prepare`` or the first run that needs them):
            the text streamed (local files record by record, hub datasets with ``streaming=True``),
            tokenised in `num_proc` processes up to `max_tokens`, one flat uint16/uint32 copy of the
            token ids, read as blocks of any `block_size`, resumable when interrupted. Without
            `val_files` / `hub_val_split`, ``shards`` holds out every record that raises
            ceil(records * `val_fraction`) instead of a seeded shuffle.
        prepared_dir: directory of the token shards (format=shards); "" for
            ``<cache_dir>/shards/<corpus key>-<tokenizer>[-max<max_tokens>]``.
        max_tokens: training tokens to prepare (format=shards), 0 for all: the stream stops there,
            mid-document. A trained bpe/char tokenizer then learns from the first 4 * max_tokens
            characters of training text, and validation text of its own (`val_files`,
            `hub_val_split`) is cut at the same count.
        num_proc: processes that tokenise when shards are prepared (format=shards); 0 for one per
            available CPU core. The shards are the same for any number.
        shard_tokens: tokens per shard file (format=shards): a shard is written, and an interrupted
            preparation resumes, in units of about this many tokens.
    """

    def __init__(
        self,
        source: Literal["embedded", "files", "hub"] = "embedded",
        embedded: EmbeddedCorpusConfig = EmbeddedCorpusConfig(),
        train_files: list[str] = [],
        val_files: list[str] = [],
        val_fraction: float = 0.05,
        text_sample_by: Literal["line", "paragraph", "article", "document"] = "paragraph",
        hub_dataset: str = "",
        hub_config: str = "",
        hub_train_split: str = "train",
        hub_val_split: str = "validation",
        text_field: str = "text",
        tokenizer: Literal["auto", "bpe", "char", "hf"] = "auto",
        bpe_vocab_size: int = 2048,
        tokenizer_path: str = "",
        block_size: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str = "data",
        seed: int = 0,
        predict_prompts: list[str] = [],
        format: Literal["blocks", "shards"] = "blocks",
        prepared_dir: str = "",
        max_tokens: int = 0,
        num_proc: int = 0,
        shard_tokens: int = 1 << 26,
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
        _check_shard_settings(format, prepared_dir, max_tokens, num_proc, shard_tokens)
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
            replay_people = _replay_people(embedded)
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
                streamed_files(train_files, val_files, val_fraction, text_field, text_sample_by, seed)
                if source == "files"
                else streamed_hub(
                    hub_dataset, hub_config, hub_train_split, hub_val_split, val_fraction, text_field
                )
            )
            corpus_key = streamed.key
        elif source == "files":
            splits, corpus_key = file_splits(
                train_files, val_files, val_fraction, text_field, text_sample_by, cache_dir, seed
            )
        else:
            splits, corpus_key = hub_splits(
                hub_dataset, hub_config, hub_train_split, hub_val_split, val_fraction, text_field, cache_dir, seed
            )

        self.prepared_dir: Path | None = None
        """The token shards' directory (format=shards), None for packed blocks."""
        if format == "shards":
            if source == "embedded":
                streamed = streamed_embedded(splits, corpus_key)
            self.tokenizer, self.prepared_dir = prepare_shards(
                streamed, tokenizer, hf_tokenizer, bpe_vocab_size, cache_dir, prepared_dir, max_tokens, num_proc,
                shard_tokens,
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

    def _probe_items(self, phrasing: str = "train") -> list[RecallItem]:
        """Probe items of a `recall_questions` key: train, heldout, replay or replay_heldout."""
        if phrasing.startswith("replay"):
            if self.replay_corpus is None:
                return []
            return self.replay_corpus.recall_probe("heldout" if phrasing == "replay_heldout" else "train")
        if self.corpus is None:
            return []
        return [item for item in self.corpus.recall_probe(phrasing) if item.person not in self.dropped_people]
