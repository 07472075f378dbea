"""``python -m midus export``: a kit checkpoint as a directory transformers loads.

    python -m midus export --ckpt_path runs/<exp>/<arm>/checkpoints/last.ckpt --out exported/<arm>

* A pure Transformer model (every block a Transformer block with the ``ffn`` branch) exports
  as its own family: `LlamaForCausalLM`, or `Qwen3ForCausalLM` with per-head q/k norms
  (`midus.checkpoint.hf_export`); load it with ``AutoModelForCausalLM.from_pretrained(dir)``.
* Any other model (memory blocks, PKM / HML / HIVE branches) exports as a custom-code
  directory holding the kit's model code (`midus.checkpoint.hf_custom_code`); load it with
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, offline, without the
  kit installed. ``--format custom`` exports a pure model that way too.

The tokenizer stored in the checkpoint is saved beside the weights, so the directory is
complete for `transformers` and for the lm-evaluation-harness's own ``hf`` model
(``lm_eval --model hf --model_args pretrained=<dir>,trust_remote_code=True``). Bad input (a
missing or foreign checkpoint, an output directory that exists and is not empty) is one
``error:`` line and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("auto", "custom")


def export_checkpoint(ckpt_path: Path, out: Path, dtype: str | None = None, export_format: str = "auto") -> str:
    """Export the kit checkpoint `ckpt_path` into the new directory `out`; returns what was written
    (``llama``, ``qwen3`` or ``custom code``).

    Raises:
        FileExistsError: `out` exists and is not an empty folder (checked first).
        FileNotFoundError, ValueError: a missing, foreign or unreadable checkpoint.
    """
    from midus.checkpoint.context import model_context, trained_block_size
    from midus.checkpoint.hf_custom_code import export_custom_code
    from midus.checkpoint.hf_export import check_hf_exportable, export_family, export_hf_checkpoint
    from midus.checkpoint.kit import checkpoint_tokenizer, model_from_checkpoint, read_kit_checkpoint

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out: {str(out)!r} exists and is not an empty folder; give a new directory")
    checkpoint = read_kit_checkpoint(ckpt_path, "--ckpt_path")
    model = model_from_checkpoint(checkpoint, ckpt_path, "--ckpt_path").eval()
    tokenizer = checkpoint_tokenizer(checkpoint)
    torch_dtype = DTYPES[dtype] if dtype else None
    family = None
    if export_format == "auto":
        try:
            check_hf_exportable(model.config)
            family = export_family(model.config)
        except ValueError:
            family = None  # memory blocks or other branches: custom code
    # The context the kit's lm-eval adapter reads this checkpoint with, so the harness's hf model reads
    # the exported directory with the same one (`midus.checkpoint.context`).
    context = model_context(model.config, trained_block_size(checkpoint))
    if family is not None:
        export_hf_checkpoint(model, out, tokenizer=tokenizer, dtype=torch_dtype, max_position_embeddings=context)
        return family
    export_custom_code(model, out, tokenizer=tokenizer, dtype=torch_dtype, max_position_embeddings=context)
    return "custom code"


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m midus export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt_path", type=Path, required=True, help="a kit checkpoint (.ckpt written by fit)")
    parser.add_argument("--out", type=Path, required=True, help="the directory to create (must not hold files)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written weights (default: the checkpoint's)")
    parser.add_argument("--format", choices=FORMATS, default="auto", dest="export_format",
                        help="auto: the model's transformers family when it has one, else custom code; "
                             "custom: custom code always")
    options = parser.parse_args(sys.argv[1:] if args is None else args)
    # Bad input raises; `midus.cli.main` turns it into one error line and exit status 2.
    written = export_checkpoint(options.ckpt_path, options.out, options.dtype, options.export_format)
    remote = ", trust_remote_code=True" if written == "custom code" else ""
    print(f"wrote {options.out} ({written}): AutoModelForCausalLM.from_pretrained({str(options.out)!r}{remote})")
