"""Import a local Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoint into a kit `MidusLM`.

Only plain torch, safetensors and transformers' config/tokenizer classes are used: the
transformers *model* is never instantiated, so importing a checkpoint costs one copy of
the weights plus the kit model. Every check on the directory and the config runs before
any tensor is read, and each failure is one error naming the file or field at fault.

    model, tokenizer = load_hf_checkpoint("path/to/llama-dir", dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from midus.checkpoint.hf_names import LAYER_NAMES, TOP_NAMES, WEIGHT_PATTERNS
from midus.model.config import ModelConfig
from midus.model.transformer import MidusLM

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def model_config_from_hf(hf_config: Any, source: str = "Hugging Face config") -> ModelConfig:
    """Map a transformers `PretrainedConfig` (llama, mistral, qwen2, qwen3) to the kit's `ModelConfig`.

    Qwen3 maps to ``qk_norm=True`` and keeps its own head_dim (``head_width`` when it is not
    hidden/heads). Raises ValueError, naming `source` and the field, for anything the kit
    would silently compute differently: an unsupported model type, a head_dim other than
    hidden/heads outside Qwen3, MLP biases, an activation other than SiLU, RoPE types other
    than default/llama3, partial rotary embeddings, and sliding-window attention that
    actually limits the context.
    """
    def fail(message: str) -> None:
        raise ValueError(f"{source}: {message}")

    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        fail(f"model_type {model_type!r} is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    head_width = 0  # the kit's "d_model / n_heads"
    if head_dim is not None and head_dim * heads != hidden:
        if model_type != "qwen3":
            fail(
                f"head_dim={head_dim} differs from hidden_size/num_attention_heads={hidden}/{heads}; "
                "the kit needs them equal"
            )
        head_width = head_dim  # Qwen3 decouples them (0.6B: 16 heads of 128 on hidden 1024)
    if getattr(hf_config, "mlp_bias", False):
        fail("mlp_bias=true is not supported; the kit's SwiGLU FFN has no biases")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        fail(f"hidden_act={act!r} is not supported; expected 'silu'")
    _check_sliding_window(hf_config, model_type, fail)

    # transformers 5 keeps RoPE settings in rope_parameters; 4.57 in rope_theta + rope_scaling.
    rope = getattr(hf_config, "rope_parameters", None) or {
        "rope_theta": getattr(hf_config, "rope_theta", 10000.0),
        **(getattr(hf_config, "rope_scaling", None) or {}),
    }
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # old configs say "type"
    scaling: dict[str, float] = {}
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if rope.get(k) is None]
        if missing:
            fail(f"rope_type 'llama3' needs {', '.join(missing)} in rope_parameters/rope_scaling")
        scaling = {k: float(rope[k]) for k in keys}
    elif rope_type != "default":
        fail(f"rope_type {rope_type!r} is not supported; expected 'default' or 'llama3'")
    # transformers rotates only the first head_dim · factor channels; the kit rotates all of them.
    partial = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if partial is not None and float(partial) != 1.0:
        fail(f"partial_rotary_factor={partial} is not supported; the kit rotates every channel of a head")

    # Llama, Mistral and Qwen3 put attention_bias on q, k, v and o alike (Qwen3 adds it to
    # q and k before their norms, as the kit does).
    qkv_bias = out_bias = bool(getattr(hf_config, "attention_bias", False))
    if model_type == "qwen2":  # Qwen2 hard-codes biases on q/k/v and none on o_proj.
        qkv_bias, out_bias = True, False
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hidden,
        n_layers=hf_config.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_width=head_width,
        ffn_hidden=hf_config.intermediate_size,
        rope_theta=float(rope["rope_theta"]),
        rope_scaling=scaling,
        norm_eps=hf_config.rms_norm_eps,
        qkv_bias=qkv_bias,
        attn_out_bias=out_bias,
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        context_length=int(getattr(hf_config, "max_position_embeddings", None) or 0),
    )


def _check_sliding_window(hf_config: Any, model_type: str, fail: Any) -> None:
    # A window at least as long as the longest supported context never masks anything.
    window = getattr(hf_config, "sliding_window", None)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if window is None or (max_pos is not None and window >= max_pos):
        return
    if model_type in ("qwen2", "qwen3"):
        # Qwen2 and Qwen3 apply the window only with use_sliding_window, and only to layers marked so.
        layer_types = getattr(hf_config, "layer_types", None)  # absent in older configs
        if not getattr(hf_config, "use_sliding_window", False) or (
            layer_types and "sliding_attention" not in layer_types
        ):
            return
        fail(f"use_sliding_window=true (sliding_window={window}) is not supported; the kit attends to the full context")
    if model_type == "mistral":
        fail(
            f"sliding_window={window} < max_position_embeddings={max_pos} is not supported; "
            "the kit attends to the full context (sliding_window must be null)"
        )


def load_hf_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[MidusLM, PreTrainedTokenizerBase | None]:
    """Load a local Hugging Face checkpoint directory as a kit model, in eval mode.

    The directory needs `config.json` and the weights as `model.safetensors`, sharded
    `model-*.safetensors` with `model.safetensors.index.json`, or the `pytorch_model*.bin`
    equivalents. Returns `(model, tokenizer)`; the tokenizer is loaded with
    `transformers.AutoTokenizer` from the same directory and is **None when the directory
    holds no tokenizer files** (none of tokenizer.json, tokenizer_config.json,
    tokenizer.model, vocab.json). Peak memory is about twice the weights in `dtype`.

    Raises FileNotFoundError for a missing directory, config or weight file, and
    ValueError for an unsupported architecture or feature, before any weights are read;
    a tensor that is missing, unexpected or of the wrong shape is a ValueError naming it.
    """
    directory = _require_dir(path)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face checkpoint directory")
    # Check the type on the raw JSON first: AutoConfig would fail on unknown architectures
    # with a message that does not say what the kit supports.
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from error
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not supported; "
            f"expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    from transformers import AutoConfig

    config = model_config_from_hf(AutoConfig.from_pretrained(directory), source=str(config_file))
    weight_files = _weight_files(directory)
    tokenizer = load_hf_tokenizer(directory) if _has_tokenizer(directory) else None

    state = _read_state_dict(weight_files, dtype)
    mapped = _map_names(state, config)
    del state
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in `dtype`: no fp32 copy of a bf16 model
    try:
        model = MidusLM(config)
    finally:
        torch.set_default_dtype(previous)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{directory}: weights do not match the model described by config.json: {error}") from error
    return model.eval(), tokenizer


def load_hf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """`transformers.AutoTokenizer` from a local directory; FileNotFoundError if it has none."""
    directory = _require_dir(path)
    if not _has_tokenizer(directory):
        raise FileNotFoundError(
            f"{directory}: no tokenizer files; looked for {', '.join(TOKENIZER_FILES)}"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _require_dir(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: is a file; expected a checkpoint directory")
    return directory


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint, following a shard index when there is one."""
    for pattern in WEIGHT_PATTERNS:
        found = sorted(directory.glob(pattern))
        if not found:
            continue
        if not pattern.endswith(".index.json"):
            return found
        index = found[0]
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            raise ValueError(f"{index}: expected JSON with a 'weight_map' of tensor name -> shard file") from error
        files = [directory / name for name in shards]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index}: lists shard {file.name}, which is not in {directory}")
        return files
    raise FileNotFoundError(f"{directory}: no weight files; looked for {', '.join(WEIGHT_PATTERNS)}")


def _read_state_dict(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            part = load_file(str(file), device="cpu")
        else:
            part = torch.load(file, map_location="cpu", weights_only=True)
        state.update({name: t.to(dtype) if t.is_floating_point() else t for name, t in part.items()})
    return state


def _map_names(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor names -> kit names; unknown names pass through so strict loading names them."""
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        short = name.removeprefix("model.")  # a bare LlamaModel checkpoint has no prefix
        match = _LAYER_KEY.fullmatch(short)
        if match and match.group(2).endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints store this derived buffer; the kit recomputes it
        if match and match.group(2) in LAYER_NAMES:
            mapped[f"blocks.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"] = tensor
        elif short in TOP_NAMES:
            mapped[TOP_NAMES[short]] = tensor
        else:
            mapped[name] = tensor
    if config.tie_embeddings and "embed.weight" in mapped:
        # Tied checkpoints usually omit lm_head; when present, transformers ties it anyway.
        mapped["lm_head.weight"] = mapped["embed.weight"]
    return mapped
