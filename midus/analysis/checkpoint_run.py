"""What every analysis command starts from: a kit checkpoint, the text to analyse it on, and
where to write.

    python -m midus <analysis> --ckpt_path runs/<exp>/<arm>/checkpoints/last.ckpt
                               [--config <fit YAML>] [--arm <arm>] [--data.<field> <value> ...]

The text comes from the ``data:`` section of, in order: ``--config`` (an ablation YAML needs
``--arm``), else the ``config.yaml`` that ``fit`` saved in the run directory next to the
checkpoint's ``checkpoints/`` folder (one written before data keys moved is read with each at its
new place, `midus.moved_keys`); ``--data.*`` flags override single fields. Analyses
read the validation split. Outputs go to ``<run dir>/analysis/`` unless ``--out_dir`` says
otherwise, and TensorBoard images into the run directory itself, beside its training curves.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse import ArgumentParser, Namespace

from midus.checkpoint.kit import checkpoint_tokenizer, model_from_checkpoint, read_kit_checkpoint
from midus.data.text_data import TextData
from midus.data.tokenizers import same_vocabulary
from midus.model.transformer import MidusLM
from midus.moved_keys import MOVED_DATA_KEYS, check_moved_keys, upgrade_config
from midus.run_files import RUN_CONFIG


@dataclass
class CheckpointRun:
    """A loaded checkpoint with the data it is analysed on and where results go."""

    checkpoint_path: Path
    run_dir: Path
    """The run directory: the parent of ``checkpoints/`` (TensorBoard events live there)."""
    out_dir: Path
    model: MidusLM
    data: TextData
    args: Namespace
    """The parsed command line (the analysis's own options included)."""
    step: int
    """The training step the checkpoint was saved at (TensorBoard images are filed under it)."""


def run_dir_of(checkpoint_path: Path) -> Path:
    """``runs/<exp>/<arm>/checkpoints/last.ckpt`` → ``runs/<exp>/<arm>``; else the file's folder."""
    folder = checkpoint_path.resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def analysis_parser(command: str, description: str) -> ArgumentParser:
    """The options every analysis shares; the command adds its own before parsing."""
    parser = ArgumentParser(prog=f"python -m midus {command}", description=description)
    parser.add_argument("--ckpt_path", type=str, required=True, help="A kit checkpoint (.ckpt written by fit).")
    parser.add_argument(
        "--config", type=Optional[str], default=None,
        help=f"YAML whose data: section gives the text (default: the run's {RUN_CONFIG} beside checkpoints/).",
    )
    parser.add_argument("--arm", type=Optional[str], default=None, help="The arm, when --config is an ablation YAML.")
    parser.add_argument(
        "--out_dir", type=Optional[str], default=None, help="Where outputs are written (default: <run dir>/analysis)."
    )
    parser.add_argument("--max_batches", type=int, default=0, help="Validation batches analysed (0: all).")
    parser.add_class_arguments(TextData, "data", fail_untyped=False)
    return parser


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name v`` or ``--name=v`` in `args` (the last one wins), else None."""
    value = None
    for index, arg in enumerate(args):
        if arg == f"--{name}" and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def data_section(checkpoint_path: Path, config: str | None, arm: str | None) -> dict[str, Any]:
    """The ``data:`` settings the analysis uses (see the module docstring for the order)."""
    from midus.ablation.config import load_ablation

    if config is None:
        path = run_dir_of(checkpoint_path) / RUN_CONFIG
        if not path.is_file():
            raise FileNotFoundError(
                f"--config: not given, and the run of {str(checkpoint_path)!r} has no {RUN_CONFIG} at {str(path)!r}; "
                "give the YAML the checkpoint was trained with (its data: section names the text)"
            )
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(document, dict):  # written by fit, perhaps before keys moved
            document = upgrade_config(document, MOVED_DATA_KEYS)
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: {config!r} is not a file")
        ablation = load_ablation(path)
        if ablation is not None:
            if arm not in ablation.arms:
                raise ValueError(
                    f"--arm: {config!r} is an ablation; name one of its arms {sorted(ablation.arms)}, got {arm!r}"
                )
            document = ablation.arm_config(arm)
        else:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
    section = document.get("data") if isinstance(document, dict) else None
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"--config: the data: section of {str(path)!r} must be a mapping, got {section!r}")
    return section or {}


def load_checkpoint_run(parser: ArgumentParser, args: list[str]) -> CheckpointRun:
    """Parse `args` with `parser` (from `analysis_parser`), load the checkpoint and build its data.

    Errors (a missing or foreign checkpoint, a missing config, a tokenizer other than the
    checkpoint's) are raised before anything is written.
    """
    if any(arg in ("-h", "--help") for arg in args):
        parser.parse_args(args)  # prints the help and exits
    check_moved_keys(args, MOVED_DATA_KEYS)  # given by the user: one error line naming the new place
    checkpoint_path = _flag(args, "ckpt_path")
    if checkpoint_path is None:
        parser.parse_args(args)  # reports the missing required option
    checkpoint = read_kit_checkpoint(checkpoint_path, "--ckpt_path")
    model = model_from_checkpoint(checkpoint, checkpoint_path, "--ckpt_path").eval()
    section = data_section(Path(checkpoint_path), _flag(args, "config"), _flag(args, "arm"))
    # The run's data settings first, so --data.* flags on the command line override them.
    parsed = parser.parse_args(["--data", yaml.safe_dump(section), *args])
    stored = checkpoint_tokenizer(checkpoint)
    if parsed.data.tokenizer == "auto" and not parsed.data.tokenizer_path and stored is not None:
        # data.tokenizer: auto means the starting model's tokenizer, which the checkpoint carries.
        parsed.data.tokenizer, parsed.data.tokenizer_path = "hf", str(checkpoint_path)
    data = parser.instantiate_classes(Namespace(data=parsed.data)).data
    if stored is not None and not same_vocabulary(stored, data.tokenizer):
        raise ValueError(
            "data: its tokenizer is not the one the checkpoint was trained with; "
            f"add --data.tokenizer hf --data.tokenizer_path {checkpoint_path}"
        )
    if len(data.tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"data: the tokenizer has {len(data.tokenizer)} tokens but the checkpoint's model only "
            f"{model.config.vocab_size}; analyse it on the data it was trained with"
        )
    run_dir = run_dir_of(Path(checkpoint_path))
    out_dir = Path(parsed.out_dir) if parsed.out_dir else run_dir / "analysis"
    step = int(checkpoint.get("global_step") or 0)
    return CheckpointRun(Path(checkpoint_path), run_dir, out_dir, model, data, parsed, step)


def fail_cleanly(error: Exception) -> None:
    """Print a command's bad-input error as one line and exit with status 2."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)
