"""The data settings of a run, one group each: the sources ``data.embedded`` (the generated biography
corpus), ``data.files`` (local files) and ``data.hub`` (a Hugging Face dataset), of which
``data.source`` says which one a run reads (`midus.data.text_data.TextData`), and ``data.shards``,
the token shards of ``data.format: shards`` (`midus.data.prepare`).

Each group checks its own values when it is built (``__post_init__``), with errors naming the
field's full config path; what needs the files or the dataset themselves is checked when they
are read (`midus.data.file_and_hub_splits`, `midus.data.streamed_text`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from midus.data.corpus.names import NAME_SPACE_SIZE
from midus.data.text_records import TEXT_SAMPLE_BY


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

    def __post_init__(self) -> None:
        if self.replay_seed < -1:
            raise ValueError(f"data.embedded.replay_seed must be >= 0, or -1 for no replay, got {self.replay_seed}")
        if self.replay_seed == -1:
            return  # the replay settings are read only with replay
        if self.replay_seed == self.seed:
            raise ValueError(
                f"data.embedded.replay_seed={self.replay_seed} equals data.embedded.seed: the replay population "
                "must be a different population (another seed)"
            )
        if not 0.0 < self.replay_share < 1.0:
            raise ValueError(f"data.embedded.replay_share must be in (0, 1) with replay, got {self.replay_share}")
        if self.replay_docs_per_person < 0:
            raise ValueError(
                "data.embedded.replay_docs_per_person must be 0 (= docs_per_person) or >= 1, "
                f"got {self.replay_docs_per_person}"
            )
        if not 0 <= self.replay_num_people <= NAME_SPACE_SIZE:
            raise ValueError(
                f"data.embedded.replay_num_people must be 0 (= num_people) or in [1, {NAME_SPACE_SIZE}], "
                f"got {self.replay_num_people}"
            )

    @property
    def replay_people(self) -> int:
        """Size of the replay population; 0 when there is none."""
        if self.replay_seed == -1:
            return 0
        return self.replay_num_people or self.num_people


def _check_val_fraction(group: str, val_fraction: float, has_validation: bool, what: str) -> None:
    """Without validation text of its own a source holds out `val_fraction` of its training records."""
    if not has_validation and not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"data.{group}.val_fraction must be in (0, 1) when no validation split is given ({what}), "
            f"got {val_fraction}"
        )


@dataclass
class FilesConfig:
    """``data.files``: local .txt, .jsonl or .parquet files (``data.source: files``)."""

    train: list[str] = field(default_factory=list)
    """Paths or globs of the training files (one file type)."""
    val: list[str] = field(default_factory=list)
    """Paths or globs of the validation files; empty splits off `val_fraction` of the training records."""
    val_fraction: float = 0.05
    """Share of the training records held out as validation when `val` is empty."""
    sample_by: Literal["line", "paragraph", "article", "document"] = "paragraph"
    """How .txt files become records: per ``line``; per ``paragraph`` (runs of lines between blank
    lines, whitespace-only lines counting as blank); per ``article`` (a WikiText ``= Title =``
    heading starts one, as lm-evaluation-harness's wikitext pages); or per ``document`` (a whole
    file). A record over `midus.data.text_records.MAX_RECORD_CHARS` (1,000,000) characters is an
    error (a warning for ``document``). .jsonl/.parquet records are unaffected."""
    text_field: str = "text"
    """Column holding the text of .jsonl and .parquet files."""
    seed: int = 0
    """Seed of the shuffle that splits off `val_fraction` (``data.format: blocks``; token shards hold
    out every record that raises ceil(records * val_fraction) instead). The training order's shuffle
    seed is the run's global seed (``seed_everything``), so seeds vary the data order."""

    def __post_init__(self) -> None:
        if self.sample_by not in TEXT_SAMPLE_BY:
            raise ValueError(f"data.files.sample_by={self.sample_by!r}; expected one of {', '.join(TEXT_SAMPLE_BY)}")
        _check_val_fraction("files", self.val_fraction, bool(self.val), "data.files.val is empty")


@dataclass
class HubConfig:
    """``data.hub``: a dataset by Hugging Face hub name or local dataset directory, read with
    `datasets.load_dataset` (``data.source: hub``)."""

    dataset: str = ""
    """Dataset name (or local dataset directory) for `datasets.load_dataset`."""
    config: str = ""
    """Dataset configuration name ("" for the default)."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "validation"
    """Split used for validation ("" or a split the dataset lacks: split off `val_fraction`)."""
    val_fraction: float = 0.05
    """Share of the training records held out as validation when the dataset has no `val_split`."""
    text_field: str = "text"
    """Column holding the text."""
    seed: int = 0
    """Seed of the shuffle that splits off `val_fraction` (``data.format: blocks``; token shards hold
    out every record that raises ceil(records * val_fraction) instead)."""

    def __post_init__(self) -> None:
        if not self.train_split:
            raise ValueError("data.hub.train_split is empty; name the split to train on")
        # Whether the dataset has `val_split` is known once it is loaded (`midus.data.file_and_hub_splits`).
        _check_val_fraction("hub", self.val_fraction, bool(self.val_split), "data.hub.val_split is empty")


@dataclass
class ShardsConfig:
    """``data.shards``: the token shards of ``data.format: shards`` (`midus.data.prepare`): where they go, how
    much text they hold, and how many processes prepare them. Each field needs that format."""

    directory: str = ""
    """Directory of the token shards; "" for ``<cache_dir>/shards/<corpus key>-<tokenizer>[-max<max_tokens>]``."""
    max_tokens: int = 0
    """Training tokens to prepare, 0 for all: the stream stops there, mid-document. A trained bpe/char
    tokenizer then learns from the first 4 * max_tokens characters of training text, and validation
    text of its own (``data.files.val``, ``data.hub.val_split``) is cut at the same count."""
    num_proc: int = 0
    """Processes that tokenise when the shards are prepared; 0 for one per available CPU core. The
    shards are the same for any number."""
    tokens_per_shard: int = 1 << 26
    """Tokens per shard file: a shard is written, and an interrupted preparation resumes, in units of
    about this many tokens."""

    def __post_init__(self) -> None:
        for name, zero in (("max_tokens", "all"), ("num_proc", "one per core")):
            if getattr(self, name) < 0:
                raise ValueError(f"data.shards.{name} must be >= 0 (0: {zero}), got {getattr(self, name)}")
        if self.tokens_per_shard < 1:
            raise ValueError(f"data.shards.tokens_per_shard must be >= 1, got {self.tokens_per_shard}")

    def check_format(self, data_format: str) -> None:
        """Refuse a setting given for another ``data.format`` than shards: it would do nothing."""
        if data_format == "shards":
            return
        default = ShardsConfig()
        for name in ("directory", "max_tokens", "num_proc", "tokens_per_shard"):
            value = getattr(self, name)
            if value != getattr(default, name):
                raise ValueError(
                    f"data.shards.{name}={value!r} applies to token shards; set data.format: shards as well "
                    f"(data.format is {data_format})"
                )
