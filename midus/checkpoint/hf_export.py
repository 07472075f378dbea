"""Export a kit `MidusLM` with a pure Llama or Qwen3 architecture to a Hugging Face directory.

The inverse of `midus.checkpoint.hf_import`: the directory gets `config.json`,
`model.safetensors` and, when given, the tokenizer, and loads with
`transformers.AutoModelForCausalLM.from_pretrained` (or back into the kit with
`load_hf_checkpoint`). The family follows from the model: with ``qk_norm`` (an imported
Qwen3, or a DUS result of one) a `Qwen3Config` for `Qwen3ForCausalLM`, otherwise a
`LlamaConfig` for `LlamaForCausalLM`. Only models the family can express export: every block
a Transformer block with the `ffn` branch, and the same bias setting on q/k/v and o. Every
check runs before anything is written, and each failure is one error naming the layer or field.

    export_hf_checkpoint(model, "out/llama-dir", tokenizer=tokenizer, dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

# The tensor-name tables of the import, inverted below, so the two directions cannot drift.
from midus.checkpoint.hf_names import LAYER_NAMES, TOP_NAMES, WEIGHT_PATTERNS
from midus.model.config import ModelConfig
from midus.model.transformer import MidusLM

if TYPE_CHECKING:
    from transformers import LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase, Qwen3Config

DEFAULT_MAX_POSITIONS = 4096
"""`max_position_embeddings` written when neither the caller, the imported model nor Llama-3 RoPE
scaling sets one. The kit has no learned positions, so the value only informs readers of the config."""

_KIT_LAYER_NAMES = {kit: hf for hf, kit in LAYER_NAMES.items()}
_KIT_TOP_NAMES = {kit: hf for hf, kit in TOP_NAMES.items()}
# LlamaForCausalLM keeps the output head outside its inner `model` (LlamaModel).
_OUTSIDE_INNER_MODEL = {"lm_head.weight"}


def export_family(config: ModelConfig) -> str:
    """The transformers family a kit model exports as: ``qwen3`` with qk_norm, else ``llama``."""
    return "qwen3" if config.qk_norm else "llama"


def check_hf_exportable(config: ModelConfig) -> None:
    """Raise ValueError, naming the layer or field, if the model's family (`export_family`)
    cannot express `config`."""
    family = {"llama": "Llama", "qwen3": "Qwen3"}[export_family(config)]
    for index, spec in enumerate(config.stack):
        if spec.block != "transformer":
            raise ValueError(
                f"layers[{index}] is a {spec.block} block; only pure {family} models "
                "(transformer blocks with ffn branches) export to Hugging Face"
            )
        if spec.branch != "ffn":
            raise ValueError(
                f"layers[{index}].branch={spec.branch!r} is not 'ffn'; only pure {family} models "
                "(transformer blocks with ffn branches) export to Hugging Face"
            )
    # The single `attention_bias` switch of Llama and Qwen3 puts biases on q, k, v *and* o.
    if config.qkv_bias != config.attn_out_bias:
        raise ValueError(
            f"qkv_bias={config.qkv_bias} differs from attn_out_bias={config.attn_out_bias}; {family}'s "
            "attention_bias sets both, so only models with equal values export to Hugging Face"
        )


def check_llama_exportable(config: ModelConfig) -> None:
    """Raise ValueError, naming the layer or field, if Llama cannot express `config`."""
    if config.qk_norm:
        raise ValueError(
            "qk_norm=True: Llama has no query/key norms; export_hf_checkpoint writes such a model as Qwen3"
        )
    check_hf_exportable(config)


def _rope_parameters(config: ModelConfig) -> tuple[dict[str, float | int | str], int]:
    """RoPE settings as transformers 5 writes them, and the context they imply."""
    rope: dict[str, float | int | str] = {"rope_type": "default", "rope_theta": config.rope_theta}
    positions = DEFAULT_MAX_POSITIONS
    if config.rope_scaling:
        # The kit stores every scaling value as a float; transformers wants this one an int.
        original = int(config.rope_scaling["original_max_position_embeddings"])
        rope.update(config.rope_scaling, rope_type="llama3", original_max_position_embeddings=original)
        positions = int(original * config.rope_scaling["factor"])
    return rope, positions


def llama_config_from_model_config(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LlamaConfig:
    """The `transformers.LlamaConfig` of a kit model (the inverse of `model_config_from_hf`).

    `max_position_embeddings` defaults to the imported model's own (``config.context_length``),
    else, with Llama-3 RoPE scaling, to the context it stretches to (original_max_position_embeddings
    x factor: transformers warns unless it is larger than the original), else to `DEFAULT_MAX_POSITIONS`.
    Special token ids come from `tokenizer`; without one they are null (LlamaConfig's defaults 1 and 2
    would be arbitrary ids in the kit's vocabulary).
    """
    from transformers import LlamaConfig

    check_llama_exportable(config)
    fields = _shared_fields(config, dtype, max_position_embeddings, tokenizer)
    return LlamaConfig(architectures=["LlamaForCausalLM"], mlp_bias=False, **fields)


def _shared_fields(
    config: ModelConfig,
    dtype: torch.dtype,
    max_position_embeddings: int | None,
    tokenizer: PreTrainedTokenizerBase | None,
) -> dict:
    """The config fields Llama and Qwen3 name alike, from the kit's config."""
    rope, positions = _rope_parameters(config)
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_width,
        num_hidden_layers=config.depth,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        # The caller's value, else the imported model's own, else what its RoPE scaling implies.
        max_position_embeddings=max_position_embeddings or config.context_length or positions,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,  # transformers 5 keeps theta and scaling together here
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=config.qkv_bias,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        dtype=dtype,
    )


def qwen3_config_from_model_config(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Qwen3Config:
    """The `transformers.Qwen3Config` of a kit model with ``qk_norm`` (defaults as in
    `llama_config_from_model_config`).

    The kit always attends to the whole context, so the per-layer list ``layer_types`` is
    written for the model's own depth (up-scaled models included) as full attention only,
    with the sliding window off: the config describes exactly the function the kit computes.
    """
    from transformers import Qwen3Config

    if not config.qk_norm:
        raise ValueError("qk_norm=False: Qwen3 always normalises queries and keys; export such a model as Llama")
    check_hf_exportable(config)
    return Qwen3Config(
        architectures=["Qwen3ForCausalLM"],
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=config.depth,
        layer_types=["full_attention"] * config.depth,
        **_shared_fields(config, dtype, max_position_embeddings, tokenizer),
    )


def hf_config_from_model_config(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PretrainedConfig:
    """The transformers config of a kit model in its `export_family` (Llama or Qwen3)."""
    if export_family(config) == "qwen3":
        return qwen3_config_from_model_config(config, dtype, max_position_embeddings, tokenizer)
    return llama_config_from_model_config(config, dtype, max_position_embeddings, tokenizer)


def export_hf_checkpoint(
    model: MidusLM,
    directory: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
    max_position_embeddings: int | None = None,
) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face Llama or, with qk_norm, Qwen3
    checkpoint (see `export_family`); return the directory.

    Writes `config.json`, `model.safetensors` (weights in `dtype`, default the model's own;
    with tied embeddings only `model.embed_tokens.weight`, as transformers itself saves them)
    and the tokenizer's files. The model itself is not changed.

    Raises ValueError before writing anything for a model its family cannot express (a memory
    block, a branch other than ffn, qkv_bias != attn_out_bias, a tied config whose head was
    untied), a tokenizer larger than the vocabulary or a non-float dtype; FileExistsError if `directory` already holds a
    config.json and `overwrite` is False. With `overwrite`, old weight files are removed
    (a stale shard index would otherwise be read instead of the new weights); other files,
    such as an old tokenizer, are left alone.
    """
    config = model.config
    check_hf_exportable(config)
    dtype = dtype or model.embed.weight.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            "ids past the vocabulary would have no embedding"
        )
    head, embed = model.lm_head.weight, model.embed.weight
    if config.tie_embeddings and head is not embed and not torch.equal(head, embed):
        raise ValueError("tie_embeddings=True but lm_head.weight differs from embed.weight; they were untied")
    hf_config = hf_config_from_model_config(config, dtype, max_position_embeddings, tokenizer)
    tensors = _hf_state_dict(model, dtype)

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory}: is a file; expected a directory to export to")
    if (directory / "config.json").exists() and not overwrite:
        raise FileExistsError(
            f"{directory}: already holds a checkpoint (config.json); pass overwrite=True to replace it"
        )

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for pattern in WEIGHT_PATTERNS:
        for stale in directory.glob(pattern):
            stale.unlink()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    # config.json last: a directory is only taken for a checkpoint once it has one, so an
    # export that fails half-way leaves nothing that loads, nor anything that blocks a retry.
    _write_config(hf_config, directory / "config.json")
    return directory


def _hf_state_dict(model: MidusLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Kit tensors under LlamaForCausalLM's (and Qwen3ForCausalLM's) names, on the CPU in `dtype`, contiguous."""
    return cpu_state_dict(model, dtype, _hf_name)


def cpu_state_dict(
    model: MidusLM, dtype: torch.dtype, rename: Callable[[str], str] = lambda name: name
) -> dict[str, torch.Tensor]:
    """`model`'s tensors for a safetensors file: under `rename(kit name)`, on the CPU in `dtype`,
    contiguous, none sharing memory; a tied head is left out (transformers re-ties it on load)."""
    tensors: dict[str, torch.Tensor] = {}
    written: set[int] = set()
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        # safetensors refuses tensors sharing memory (e.g. one block module placed twice).
        if tensor.untyped_storage().data_ptr() in written:
            tensor = tensor.clone()
        written.add(tensor.untyped_storage().data_ptr())
        tensors[rename(name)] = tensor
    return tensors


def _hf_name(name: str) -> str:
    """`blocks.3.attn.q_proj.weight` -> `model.layers.3.self_attn.q_proj.weight`, and so on."""
    if name in _KIT_TOP_NAMES:
        hf = _KIT_TOP_NAMES[name]
        return hf if hf in _OUTSIDE_INNER_MODEL else f"model.{hf}"
    prefix, _, rest = name.partition(".")
    index, _, suffix = rest.partition(".")
    if prefix == "blocks" and index.isdigit() and suffix in _KIT_LAYER_NAMES:
        return f"model.layers.{index}.{_KIT_LAYER_NAMES[suffix]}"
    raise ValueError(f"tensor {name!r} has no Hugging Face Llama/Qwen3 counterpart")


def _write_config(hf_config: PretrainedConfig, path: Path) -> None:
    # transformers 4.x reads rope_theta/rope_scaling and ignores rope_parameters, so it would
    # silently build RoPE with theta 10000; the legacy keys (equal values) keep such readers
    # right. transformers 5 reads them back into rope_parameters without a warning.
    fields = hf_config.to_diff_dict()  # what save_pretrained writes: no generic defaults
    # Always explicit: transformers 4.x defaults tie_word_embeddings to True.
    fields["tie_word_embeddings"] = hf_config.tie_word_embeddings
    fields["rope_parameters"] = dict(hf_config.rope_parameters)
    rope = dict(hf_config.rope_parameters)
    fields["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] != "default":
        fields["rope_scaling"] = rope
    path.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
