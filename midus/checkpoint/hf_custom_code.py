"""Export any kit model as a transformers custom-code directory (``trust_remote_code=True``).

The directory holds the kit's own model code, so a model with memory blocks (any branch and
value layout) loads in transformers exactly as the kit builds it:

* ``modeling_midus.py``: `midus.checkpoint.hf_modeling` (config and causal-LM classes);
* ``midus_model*.py``: every file of the ``midus/model`` package, flattened into one folder
  (``midus/model/branches/hml.py`` becomes ``midus_model_branches_hml.py``) with its
  ``from midus.model... import`` lines rewritten as relative imports, which is the form
  transformers copies along with a remote-code module;
* ``config.json`` (``model_type: midus``, the `ModelConfig` under ``midus_config``, and
  ``auto_map`` naming the two classes), ``model.safetensors`` (the kit's tensor names under
  ``model.``) and the tokenizer's files.

The model package imports nothing but torch and the standard library; a kit import outside
it would make the directory depend on an installed kit, and is refused when exporting.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

import midus.model
from midus.checkpoint import hf_modeling
from midus.checkpoint.context import model_context
from midus.checkpoint.hf_export import cpu_state_dict
from midus.model.transformer import MidusLM

MODELING_FILE = "modeling_midus.py"
AUTO_MAP = {
    "AutoConfig": "modeling_midus.MidusHFConfig",
    "AutoModelForCausalLM": "modeling_midus.MidusForCausalLM",
}
_MODEL_PACKAGE = Path(midus.model.__file__).parent
_FROM_IMPORT = re.compile(r"^(?P<indent>\s*)from (?P<module>midus(?:\.\w+)*) import (?P<names>.+)$", re.MULTILINE)
_PLAIN_IMPORT = re.compile(r"^\s*import midus\b", re.MULTILINE)


def model_sources() -> dict[str, str]:
    """{dotted module name: source} of every file of the ``midus.model`` package."""
    sources = {}
    for path in sorted(_MODEL_PACKAGE.rglob("*.py")):
        parts = path.relative_to(_MODEL_PACKAGE.parent.parent).with_suffix("").parts
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[dotted] = path.read_text(encoding="utf-8")
    return sources


def flat_name(dotted: str) -> str:
    """``midus.model.branches.hml`` -> ``midus_model_branches_hml`` (a file of the export directory)."""
    return dotted.replace(".", "_")


def relative_imports(source: str, modules: set[str], where: str) -> str:
    """`source` with every ``from midus... import`` of one of `modules` made relative to the flat folder.

    ``from midus.model.branches import ffn, hml`` (submodules imported for their side effect of
    registering themselves) becomes one ``from .<flat> import *`` per submodule, since
    transformers only copies files named after a dot.

    Raises:
        ValueError: naming `where` for a kit import outside `modules` or a plain ``import midus``.
    """
    if _PLAIN_IMPORT.search(source):
        raise ValueError(f"{where}: 'import midus...' cannot be made relative; use 'from midus... import'")

    def rewrite(match: re.Match[str]) -> str:
        module, names, indent = match["module"], match["names"], match["indent"]
        if module not in modules:
            raise ValueError(f"{where}: imports {module}, which is not part of the exported model package")
        listed = [name.strip() for name in names.split("#")[0].split(",") if name.strip()]
        if listed and all(f"{module}.{name}" in modules for name in listed):
            lines = [f"{indent}from .{flat_name(f'{module}.{name}')} import *  # noqa: F401,F403" for name in listed]
            return "\n".join(lines)
        return f"{indent}from .{flat_name(module)} import {names}"

    return _FROM_IMPORT.sub(rewrite, source)


def custom_code_files() -> dict[str, str]:
    """{file name: source} of an export directory's code: ``modeling_midus.py`` and the model package."""
    sources = model_sources()
    modules = set(sources)
    files = {f"{flat_name(name)}.py": relative_imports(text, modules, name) for name, text in sources.items()}
    wrapper = relative_imports(Path(hf_modeling.__file__).read_text(encoding="utf-8"), modules, hf_modeling.__name__)
    # Importing midus.model.branches.registry runs midus/model/branches/__init__.py first (which
    # registers every branch); flat files have no parent package, so the wrapper runs each
    # package's file itself, before anything else.
    packages = sorted(name for name in modules if any(other.startswith(f"{name}.") for other in modules))
    runs = "".join(f"from .{flat_name(name)} import *  # noqa: F401,F403,E402\n" for name in packages)
    head, future, rest = wrapper.partition("from __future__ import annotations\n")
    files[MODELING_FILE] = f"{head}{future}\n{runs}{rest}" if future else runs + wrapper
    return files


def export_custom_code(model: MidusLM, directory: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                       max_position_embeddings: int | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a custom-code directory that transformers loads with
    ``trust_remote_code=True``; returns the directory. The model is not changed.
    `max_position_embeddings` (the context readers such as lm-evaluation-harness take) defaults
    to the model's `midus.checkpoint.context.model_context`.

    Raises:
        ValueError: a non-float `dtype`, or a tokenizer larger than the vocabulary (before writing).
        FileExistsError: `directory` exists and is not an empty folder.
    """
    from safetensors.torch import save_file

    config = model.config
    dtype = dtype or model.embed.weight.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory}: exists and is not an empty folder; choose a new output directory")
    files = custom_code_files()  # a kit import outside the model package fails here, before writing
    hf_config = hf_modeling.MidusHFConfig(
        midus_config=dataclasses.asdict(config),
        architectures=["MidusForCausalLM"],
        auto_map=AUTO_MAP,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        dtype=str(dtype).removeprefix("torch."),
        max_position_embeddings=max_position_embeddings or model_context(config),
    )
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    tensors = cpu_state_dict(model, dtype, lambda name: f"model.{name}")  # MidusForCausalLM.model
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    hf_config.save_pretrained(str(directory))  # config.json last: only a finished export loads
    return directory
