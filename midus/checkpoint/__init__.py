"""Every checkpoint format of the kit, and the one import path for them (plain PyTorch).

* kit checkpoints (`kit`): the Lightning ``.ckpt`` of ``fit`` with the model config, what the
  base build gave the model and the tokenizer stored in it — `load_kit_checkpoint`,
  `read_kit_checkpoint`, `model_from_checkpoint`, `stored_model_source`, `checkpoint_tokenizer`;
* Hugging Face import (`hf_import`): a local Llama / Mistral / Qwen2 / Qwen3 directory → kit model —
  `load_hf_checkpoint`, `load_hf_tokenizer`, `model_config_from_hf`;
* Hugging Face export (`hf_export`): a pure-Llama (with qk_norm: pure-Qwen3) kit model → a
  directory `transformers` loads — `export_hf_checkpoint`;
* either source as the start of a run (`base_model`): `load_base`, `base_location`, `base_has_tokenizer`.

Depends on `midus.model` only; never on Lightning, the data or the training code.
"""

from midus.checkpoint.base_model import base_has_tokenizer, base_location, load_base
from midus.checkpoint.hf_export import export_hf_checkpoint
from midus.checkpoint.hf_import import load_hf_checkpoint, load_hf_tokenizer, model_config_from_hf
from midus.checkpoint.kit import (
    MODEL_CONFIG_KEY,
    SOURCE_KEY,
    TOKENIZER_KEY,
    checkpoint_tokenizer,
    frozen_parameter_names,
    kit_entries,
    load_kit_checkpoint,
    model_from_checkpoint,
    read_kit_checkpoint,
    stored_model_source,
    tokenizer_from_record,
    tokenizer_record,
)

__all__ = [
    "MODEL_CONFIG_KEY",
    "SOURCE_KEY",
    "TOKENIZER_KEY",
    "base_has_tokenizer",
    "base_location",
    "checkpoint_tokenizer",
    "export_hf_checkpoint",
    "frozen_parameter_names",
    "kit_entries",
    "load_base",
    "load_hf_checkpoint",
    "load_hf_tokenizer",
    "load_kit_checkpoint",
    "model_config_from_hf",
    "model_from_checkpoint",
    "read_kit_checkpoint",
    "stored_model_source",
    "tokenizer_from_record",
    "tokenizer_record",
]
