"""``python -m midus prepare``: tokenise a run's text into token shards once, before ``fit``.

    python -m midus prepare --config experiments/my_run.yaml [--data.shards.num_proc 8] \
        [--data.shards.max_tokens 1000000000]
    python -m midus fit     --config experiments/my_run.yaml

It reads the ``data:`` section of the YAML that ``fit`` takes (every ``--data.*`` flag of
``fit`` works here too and overrides it), which must say ``format: shards``, and writes what
that ``fit`` then reads (`midus.data.prepare`): the same directory, tokenizer and shards. An
interrupted preparation continues where it stopped when run again. ``data.tokenizer: auto``
takes the tokenizer of the YAML's ``model.pretrained`` or ``model.upscale.base_checkpoint`` as
``fit`` does. An ablation YAML is accepted when no arm changes ``data.*`` (its arms then share
one preparation).

Bad input (a missing file, a wrong field, a directory prepared with other settings, a data key
that moved: `midus.moved_keys`) is one ``error:`` line naming the field and exit status 2,
before anything is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from midus.data.starting_tokenizer import StartingModel, refuse_a_new_tokenizer, resolve_tokenizer
from midus.data.text_data import TextData
from midus.moved_keys import MOVED_DATA_KEYS, check_moved_keys

log = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    """The command's options: ``--config``, every ``--data.*`` field of `TextData`, and the starting model."""
    parser = ArgumentParser(
        prog="python -m midus prepare",
        description="Tokenise the data: section's text into token shards (data.format: shards), once.",
    )
    parser.add_argument(
        "--config", type=Optional[str], default=None,
        help="The YAML fit takes; its data: section (and model.pretrained / model.upscale.base_checkpoint) is read.",
    )
    parser.add_argument(
        "--model.pretrained", type=Optional[str], default=None,
        help="A Hugging Face model whose tokenizer data.tokenizer: auto takes (default: the YAML's).",
    )
    parser.add_argument(
        "--model.upscale.base_checkpoint", type=Optional[str], default=None,
        help="A base (.ckpt or directory) whose tokenizer data.tokenizer: auto takes (default: the YAML's).",
    )
    parser.add_class_arguments(TextData, "data", fail_untyped=False)
    return parser


def _config_document(config: str) -> dict[str, Any]:
    """The YAML of ``--config``: a fit config, or an ablation whose arms leave ``data`` alone."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"--config: {config!r} is not a file")
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(document, dict):
        raise ValueError(f"--config: {config!r} is not a mapping of settings")
    ablation = document.get("ablation")
    if isinstance(ablation, dict):
        arms = ablation.get("arms") or {}
        changing = sorted(
            arm for arm, overrides in arms.items()
            if any(key == "data" or str(key).startswith("data.") for key in (overrides or {}))
        )
        if changing:
            raise ValueError(
                f"--config: {config!r} is an ablation whose arms {changing} change data.*; prepare reads one data: "
                "section, so give that arm's values as --data.* flags"
            )
    section = document.get("data")
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"--config: the data: section of {config!r} must be a mapping, got {section!r}")
    return document


def _starting_model(document: dict[str, Any], parsed: Namespace) -> StartingModel:
    """The model the run starts from, as fit finds it (the flags over the YAML's ``model:`` section)."""
    model = document.get("model") or {}
    upscale = model.get("upscale") or {}
    return StartingModel.of(
        parsed.model.pretrained or model.get("pretrained"),
        parsed.model.upscale.base_checkpoint or upscale.get("base_checkpoint"),
        upscale.get("base_made_by"),
    )


def prepare(args: list[str]) -> TextData:
    """Parse `args`, check them, and prepare the shards (or find them prepared); the data."""
    if "-h" in args or "--help" in args:
        # --help (which exits) shows the embedded corpus's field docs too, as fit's does.
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    check_moved_keys(args, MOVED_DATA_KEYS)
    parser = build_parser()
    config = None
    for index, arg in enumerate(args):  # --config first: its data: section is the base the flags override
        if arg == "--config" and index + 1 < len(args):
            config = args[index + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    document = _config_document(config) if config else {}
    parsed = parser.parse_args(["--data", yaml.safe_dump(document.get("data") or {}), *args])
    data = parsed.data
    if data.format != "shards":
        raise ValueError(
            f"data.format={data.format}: prepare writes token shards, which fit reads with data.format: shards; "
            "add format: shards to the YAML's data: section (or give --data.format shards to both commands)"
        )
    start = _starting_model(document, parsed)
    refuse_a_new_tokenizer(data.tokenizer, start)
    data.tokenizer, data.tokenizer_path = resolve_tokenizer(data.tokenizer, data.tokenizer_path, start)
    return parser.instantiate_classes(Namespace(data=data)).data


def main(args: list[str]) -> None:
    """``python -m midus prepare --config <fit YAML> [--data.<field> <value> ...]``."""
    data = prepare(list(args))
    directory = data.prepared_dir
    files = [path for path in directory.iterdir() if path.suffix == ".bin"]
    size = sum(path.stat().st_size for path in files)
    tokens = data.train_blocks.tokens + data.val_blocks.tokens
    print(
        f"prepared {directory}: {data.train_blocks.tokens:,} training and {data.val_blocks.tokens:,} validation "
        f"tokens in {len(files)} shards of {data.train_blocks.dtype.name}, {size / 1e6:,.1f} MB "
        f"({size / max(tokens, 1):.2f} bytes a token); vocabulary {data.vocab_size}, "
        f"{len(data.train_blocks)} training blocks of {data.settings['block_size']}"
    )
