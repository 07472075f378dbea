"""The kit's checkpoint format: a Lightning ``.ckpt`` written by `CausalLM`, plus its own entries.

* ``midus_model_config``: the resolved architecture (`ModelConfig` as plain data), so an
  up-scaled or imported model reloads without its base and can itself be up-scaled again;
* ``midus_tokenizer``: the training tokenizer as plain strings (`tokenizer_record`), so
  evaluation needs only the file.
* ``midus_training_progress``: tokens and sequences trained so far, so a resumed run's
  counts continue (written and read by `CausalLM`).
* ``midus_sparse_memory``: under ``model.sparse_memory``, the value rows each memory block trains,
  so a resumed fit trains the same rows (written and read by `CausalLM`; the weights are the
  ordinary model's, each table merged).
* ``midus_model_source``: what building the model from its base gave it beyond its config (the
  parameters it froze, the base's size), so ``validate``/``test``/``predict``/resume rebuild the
  trained model from the file alone, base gone (`stored_model_source`).

Model weights are the LightningModule's ``state_dict`` entries under ``model.``. Writing
(`kit_entries`) and reading (`read_kit_checkpoint`, `load_kit_checkpoint`) live here only;
files are unpickled as data only (`midus.checkpoint.safe_load`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# MOVED_MODULES is kept importable from here, where it was defined before safe_load.
from midus.checkpoint.safe_load import MOVED_MODULES, CheckpointError, load_checkpoint_data  # noqa: F401
from midus.model.config import ModelConfig
from midus.model.transformer import MidusLM

MODEL_CONFIG_KEY = "midus_model_config"
TOKENIZER_KEY = "midus_tokenizer"
PROGRESS_KEY = "midus_training_progress"
"""Tokens and sequences trained since step 0, which `CausalLM` restores on resume."""
SPARSE_MEMORY_KEY = "midus_sparse_memory"
"""``{memory block label: trainable value rows}`` of a fit under ``model.sparse_memory``."""
SOURCE_KEY = "midus_model_source"
"""``{"frozen_parameters": [names], "base_parameters": int}``: what the base build gave the model."""
STATE_PREFIX = "model."
# Path segments that wrappers insert into parameter names: FSDP (use_orig_params), activation
# checkpointing and torch.compile's OptimizedModule. Stripped as torch's own FSDP state-dict code
# cleans names (torch.distributed.fsdp._common_utils.clean_tensor_name), so a name is the bare model's.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")



# The tokenizer as plain strings: the `tokenizers` JSON and the special tokens' text, so a checkpoint
# stays loadable without unpickling tokenizer objects and evaluation needs nothing but the file.
def tokenizer_record(tokenizer: PreTrainedTokenizerBase) -> dict[str, str] | None:
    """The tokenizer as plain strings (stored in kit checkpoints); None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    record = {"tokenizer_json": backend.to_str()}
    for role in ("eos_token", "pad_token", "unk_token", "bos_token"):
        if getattr(tokenizer, role, None) is not None:
            record[role] = str(getattr(tokenizer, role))
    return record


def tokenizer_from_record(record: dict[str, str]) -> PreTrainedTokenizerFast:
    """The tokenizer `tokenizer_record` stored."""
    specials = {role: value for role, value in record.items() if role != "tokenizer_json"}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(record["tokenizer_json"]),
        model_input_names=["input_ids", "attention_mask"],
        **specials,
    )


def kit_entries(
    config: ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    frozen_parameters: Iterable[str] = (),
    base_parameters: int = 0,
) -> dict[str, Any]:
    """The entries a kit checkpoint adds to Lightning's: the model config, what the base build gave
    the model (`frozen_parameters`, `base_parameters`; `stored_model_source`) and, when it can be
    stored as strings, the tokenizer."""
    entries: dict[str, Any] = {
        MODEL_CONFIG_KEY: dataclasses.asdict(config),
        SOURCE_KEY: {"frozen_parameters": sorted(frozen_parameters), "base_parameters": int(base_parameters)},
    }
    record = tokenizer_record(tokenizer) if tokenizer is not None else None
    if record is not None:
        entries[TOKENIZER_KEY] = record
    return entries


def frozen_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of `model`'s parameters that do not train (``requires_grad`` false), as the bare
    model names them whatever wraps it (FSDP, activation checkpointing, torch.compile)."""
    names = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            for segment in _WRAPPER_SEGMENTS:
                name = name.replace(segment, "")
            names.append(name)
    return names


def stored_model_source(checkpoint: dict) -> dict | None:
    """What the base build gave the model of a checkpoint `read_kit_checkpoint` returned:
    ``{"frozen_parameters": [names], "base_parameters": int}``.

    A checkpoint written before the kit stored it gets the from-scratch answer (nothing frozen, no
    base) when its hyperparameters name no base; otherwise None: only its base can tell.
    """
    source = checkpoint.get(SOURCE_KEY)
    if isinstance(source, dict):
        return {
            "frozen_parameters": [str(name) for name in source.get("frozen_parameters", [])],
            "base_parameters": int(source.get("base_parameters", 0)),
        }
    hyper = checkpoint.get("hyper_parameters")
    upscale = hyper.get("upscale") if isinstance(hyper, dict) else None
    if dataclasses.is_dataclass(upscale):
        upscale = dataclasses.asdict(upscale)
    upscale = upscale if isinstance(upscale, dict) else {}
    names_a_base = (
        not isinstance(hyper, dict) or bool(hyper.get("pretrained"))
        or bool(upscale.get("base_checkpoint")) or upscale.get("method", "none") != "none"
    )
    return None if names_a_base else {"frozen_parameters": [], "base_parameters": 0}


def read_kit_checkpoint(path: str | Path, field_name: str = "checkpoint", mmap: bool = False) -> dict:
    """The raw dictionary of a Lightning checkpoint written by the kit's `CausalLM`, read as
    data only (`load_checkpoint_data`; `mmap` maps the tensors instead of reading them).

    Raises:
        FileNotFoundError: nothing at `path`.
        CheckpointError (a ValueError): a file that is not a checkpoint, one not written by the
            kit, or one that needs arbitrary unpickling.
    """
    checkpoint = load_checkpoint_data(path, field_name, mmap)
    if isinstance(checkpoint, dict) and dataclasses.is_dataclass(checkpoint.get(MODEL_CONFIG_KEY)):
        # Written while the config was stored as the dataclass itself (issue-4 runs).
        checkpoint[MODEL_CONFIG_KEY] = dataclasses.asdict(checkpoint[MODEL_CONFIG_KEY])
    if isinstance(checkpoint, dict) and not isinstance(checkpoint.get(MODEL_CONFIG_KEY), dict):
        legacy = _from_scratch_config(checkpoint)
        if legacy is not None:
            checkpoint[MODEL_CONFIG_KEY] = legacy
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(MODEL_CONFIG_KEY), dict):
        raise CheckpointError(
            f"{field_name}: {str(path)!r} was not written by the kit's fit (it has no {MODEL_CONFIG_KEY!r}); "
            "give a kit .ckpt or a Hugging Face model directory"
        )
    return checkpoint


def _from_scratch_config(checkpoint: dict) -> dict | None:
    """The model config of a checkpoint written before the kit stored it: a from-scratch run's
    hyperparameters hold it as given (an up-scaled or imported model's do not, so: None)."""
    hyper = checkpoint.get("hyper_parameters")
    if not isinstance(hyper, dict) or hyper.get("pretrained") or "upscale" in hyper:
        return None
    config = hyper.get("config")
    return config if isinstance(config, dict) and config.get("vocab_size") else None


def model_from_checkpoint(checkpoint: dict, path: str | Path, field_name: str = "checkpoint") -> MidusLM:
    """Rebuild the `MidusLM` of a checkpoint `read_kit_checkpoint` returned."""
    state = {
        name[len(STATE_PREFIX):]: value for name, value in checkpoint.get("state_dict", {}).items()
        if name.startswith(STATE_PREFIX)
    }
    try:
        model = MidusLM(ModelConfig(**checkpoint[MODEL_CONFIG_KEY]))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field_name}: {str(path)!r} holds an invalid model config ({error})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{field_name}: {str(path)!r} does not match its own architecture "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model


def checkpoint_tokenizer(checkpoint: dict) -> PreTrainedTokenizerFast | None:
    """The tokenizer stored in a kit checkpoint (None in checkpoints written before it was kept)."""
    record = checkpoint.get(TOKENIZER_KEY)
    return tokenizer_from_record(record) if isinstance(record, dict) else None


def load_kit_checkpoint(path: Path, field_name: str = "checkpoint") -> MidusLM:
    """Rebuild the `MidusLM` of a Lightning checkpoint written by the kit's `CausalLM`."""
    return model_from_checkpoint(read_kit_checkpoint(path, field_name), path, field_name)
