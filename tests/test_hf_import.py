"""Importing Hugging Face checkpoints: logits/generation parity, tokenizer, and bad input.

Every fixture is a tiny random transformers model saved offline into `tmp_path`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from midus.checkpoint.hf_import import load_hf_checkpoint, load_hf_tokenizer, model_config_from_hf
from midus.model import MidusLM

TINY = dict(
    vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
)
# Llama-3 scaling whose band edges (wavelengths 16..64) fall inside the range of head_dim 16
# with rope_theta 500 (wavelengths 6.3..1440): 6 of the 8 frequency pairs are rescaled.
LLAMA3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)



def save_random(
    model_cls: type[PreTrainedModel], config: object, directory: Path, **save_kwargs: object
) -> PreTrainedModel:
    """Build, randomise every tensor (norm weights and biases too, so a swapped name shows), save."""
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(directory, **save_kwargs)
    return model


def batch(time: int = 24) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, time), generator=torch.Generator().manual_seed(1))


def assert_logits_match(hf: PreTrainedModel, kit: MidusLM) -> None:
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(kit(ids), hf(ids).logits)


@pytest.mark.parametrize(
    ("model_cls", "config"),
    [
        (LlamaForCausalLM, LlamaConfig(**TINY)),
        (LlamaForCausalLM, LlamaConfig(**TINY, tie_word_embeddings=True)),
        (LlamaForCausalLM, LlamaConfig(**TINY, attention_bias=True)),
        (LlamaForCausalLM, LlamaConfig(**TINY, rope_theta=500.0, rope_scaling=dict(LLAMA3))),
        (Qwen2ForCausalLM, Qwen2Config(**TINY)),
        (MistralForCausalLM, MistralConfig(**TINY, sliding_window=None)),
    ],
    ids=["llama", "llama-tied", "llama-bias", "llama3-rope", "qwen2", "mistral"],
)
def test_logits_match_transformers(tmp_path: Path, model_cls: type, config: object) -> None:
    hf = save_random(model_cls, config, tmp_path)
    kit, tokenizer = load_hf_checkpoint(tmp_path)
    assert tokenizer is None  # no tokenizer files were saved
    assert not kit.training
    assert_logits_match(hf, kit)
    if kit.config.tie_embeddings:
        assert kit.lm_head.weight is kit.embed.weight


def test_llama3_scaling_matters_for_the_parity_test(tmp_path: Path) -> None:
    # Guard against a vacuous llama3 case: the same weights without scaling must differ.
    hf = save_random(LlamaForCausalLM, LlamaConfig(**TINY, rope_theta=500.0, rope_scaling=dict(LLAMA3)), tmp_path)
    kit, _ = load_hf_checkpoint(tmp_path)
    assert kit.config.rope_scaling == {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    unscaled = MidusLM(dataclasses.replace(kit.config, rope_scaling={})).eval()
    unscaled.load_state_dict(kit.state_dict())
    changed = ~torch.isclose(kit.rotary.inv_freq, unscaled.rotary.inv_freq)
    assert int(changed.sum()) == 6
    ids = batch()
    with torch.no_grad():
        assert (unscaled(ids) - hf(ids).logits).abs().max() > 1e-2


def test_sharded_safetensors_and_pytorch_bin(tmp_path: Path) -> None:
    sharded, legacy = tmp_path / "sharded", tmp_path / "bin"
    hf = save_random(LlamaForCausalLM, LlamaConfig(**TINY), sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert_logits_match(hf, load_hf_checkpoint(sharded)[0])
    # transformers 5 always writes safetensors, so the legacy .bin layout is built by hand.
    legacy.mkdir()
    hf.config.save_pretrained(legacy)
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin")
    assert_logits_match(hf, load_hf_checkpoint(legacy)[0])


def test_dtype_is_applied(tmp_path: Path) -> None:
    save_random(LlamaForCausalLM, LlamaConfig(**TINY, tie_word_embeddings=True), tmp_path)
    kit, _ = load_hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in kit.parameters()} == {torch.bfloat16}
    assert kit.lm_head.weight is kit.embed.weight
    assert torch.get_default_dtype() == torch.float32  # restored after building
    assert kit(batch(4)).dtype == torch.bfloat16


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    hf = save_random(Qwen2ForCausalLM, Qwen2Config(**TINY), tmp_path)
    kit, _ = load_hf_checkpoint(tmp_path)
    prompt = batch(7)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(kit.generate(prompt, max_new_tokens=12), expected)


def test_tokenizer_comes_from_the_checkpoint_directory(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello kit", "depth up-scaling 123"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    bpe.train_from_iterator(text * 4, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<eos>", model_input_names=["input_ids", "attention_mask"]
    ).save_pretrained(tmp_path)
    save_random(LlamaForCausalLM, LlamaConfig(**{**TINY, "vocab_size": 300}), tmp_path)

    kit, tokenizer = load_hf_checkpoint(tmp_path)
    sentence = "hello brown fox, up-scaling 42!"
    ids = tokenizer(sentence)["input_ids"]
    assert tokenizer.decode(ids) == sentence
    assert max(ids) < kit.config.vocab_size
    assert load_hf_tokenizer(tmp_path).encode(sentence) == ids


def test_model_config_from_hf_maps_fields() -> None:
    config = model_config_from_hf(LlamaConfig(**TINY, rms_norm_eps=1e-6, rope_theta=500.0, rope_scaling=dict(LLAMA3)))
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.n_kv_heads) == (100, 64, 2, 4, 2)
    assert (config.ffn_hidden, config.norm_eps, config.rope_theta) == (128, 1e-6, 500.0)
    assert config.rope_scaling["factor"] == 32.0 and not config.qkv_bias and not config.tie_embeddings
    qwen = model_config_from_hf(Qwen2Config(**TINY))
    assert (qwen.qkv_bias, qwen.attn_out_bias, qwen.rope_scaling) == (True, False, {})


def test_model_config_from_transformers_4_57_style_config() -> None:
    # 4.57 has no rope_parameters: rope_theta plus rope_scaling (older files say "type").
    old = LlamaConfig(**TINY).to_dict()
    old.update(rope_parameters=None, rope_theta=500.0, rope_scaling={**LLAMA3, "type": "llama3"})
    del old["rope_scaling"]["rope_type"]
    config = model_config_from_hf(SimpleNamespace(**old))
    assert config.rope_theta == 500.0 and config.rope_scaling["original_max_position_embeddings"] == 64
    old.update(rope_scaling=None)
    assert model_config_from_hf(SimpleNamespace(**old)).rope_scaling == {}


# ---- bad input: one clear error naming the file or field, before any weights are read ----


def write_config(directory: Path, **changes: object) -> Path:
    """A config.json only (no weights): a feature error must come before the weight lookup."""
    directory.mkdir(exist_ok=True)
    fields = {**LlamaConfig(**TINY).to_dict(), **changes}
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


def test_missing_path_and_file_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint directory"):
        load_hf_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="file.txt: is a file; expected a checkpoint directory"):
        load_hf_checkpoint(tmp_path / "file.txt")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_checkpoint(tmp_path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    message = r"config.json: model_type 'gpt2' is not supported; expected one of llama, mistral, qwen2"
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        model_config_from_hf(GPT2Config())


def test_config_without_weights(tmp_path: Path) -> None:
    write_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no weight files; looked for model.safetensors.index.json, model\*"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(head_dim=32), "head_dim=32 differs from hidden_size/num_attention_heads=64/4"),
        (dict(mlp_bias=True), "mlp_bias=true is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        *[
            (dict(rope_parameters={"rope_type": kind, "factor": 2.0, "rope_theta": 1e4}),
             f"rope_type '{kind}' is not supported")
            for kind in ("yarn", "linear", "dynamic")
        ],
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0),
         "use_sliding_window=true"),
        (dict(model_type="mistral", sliding_window=16), "sliding_window=16 < max_position_embeddings=2048"),
    ],
    ids=["head_dim", "mlp_bias", "gelu", "yarn", "linear", "dynamic", "qwen2-window", "mistral-window"],
)
def test_unsupported_features(tmp_path: Path, changes: dict, message: str) -> None:
    write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        load_hf_checkpoint(tmp_path)


def test_harmless_sliding_windows_are_accepted(tmp_path: Path) -> None:
    # Qwen2 stores a window it does not use; a Mistral window as long as the context masks nothing.
    assert model_config_from_hf(Qwen2Config(**TINY, use_sliding_window=False, sliding_window=16)).n_layers == 2
    assert model_config_from_hf(MistralConfig(**TINY, sliding_window=2048)).n_layers == 2


def test_weight_mismatch_names_the_tensor(tmp_path: Path) -> None:
    save_random(LlamaForCausalLM, LlamaConfig(**TINY), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    names = r"blocks\.1\.branch\.up_proj\.weight(.|\n)*model\.layers\.0\.self_attn\.extra"
    with pytest.raises(ValueError, match=names):
        load_hf_checkpoint(tmp_path)


def test_shard_index_naming_a_missing_shard(tmp_path: Path) -> None:
    write_config(tmp_path)
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="lists shard model-00001-of-00002.safetensors"):
        load_hf_checkpoint(tmp_path)


def test_tokenizer_absent(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer files; looked for tokenizer.json"):
        load_hf_tokenizer(tmp_path)
