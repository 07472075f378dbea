"""Exporting kit models to Hugging Face Llama directories: parity, round trip, tokenizer, refusals.

Every model is a tiny random kit model with non-trivial norm weights and biases (so a
swapped tensor name shows in the logits), exported into `tmp_path`; nothing needs a network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from midus.checkpoint.hf_export import export_hf_checkpoint, llama_config_from_model_config
from midus.checkpoint.hf_import import load_hf_checkpoint, model_config_from_hf
from midus.data.tokenizers import train_char
from midus.model import MidusLM
from midus.model.config import LayerSpec, ModelConfig

VOCAB = 60
BASE = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, ffn_hidden=96, init_std=0.2)
# Llama-3 scaling whose band edges fall inside the wavelengths of head_dim 16 with theta 500
# (as in test_hf_import), so most frequency pairs are rescaled and a lost scaling shows.
LLAMA3 = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
CASES = {
    "gqa": dict(n_kv_heads=2),
    "tied": dict(tie_embeddings=True),
    "llama3-rope": dict(rope_theta=500.0, rope_scaling=dict(LLAMA3)),
    "bias": dict(qkv_bias=True, attn_out_bias=True),
    "layers-list": dict(layers=[LayerSpec("transformer", "ffn") for _ in range(3)]),
    "all": dict(
        n_kv_heads=1, tie_embeddings=True, rope_theta=500.0, rope_scaling=dict(LLAMA3), qkv_bias=True,
        attn_out_bias=True, norm_eps=1e-6, layers=[{"block": "transformer", "branch": "ffn"}] * 3,
    ),
}


def random_model(seed: int = 0, **changes: object) -> MidusLM:
    """A tiny kit model in eval mode; norm weights and (zero-initialised) biases randomised too."""
    torch.manual_seed(seed)
    model = MidusLM(ModelConfig(**{**BASE, **changes})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model


def batch(time: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, time), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_transformers_logits_match(tmp_path: Path, changes: dict, transformers_warnings: list[str]) -> None:
    kit = random_model(**changes)
    assert export_hf_checkpoint(kit, tmp_path) == tmp_path
    hf, info = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    hf.eval()
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert transformers_warnings == []
    ids = batch()
    with torch.no_grad():
        expected = kit(ids)
        assert expected.std() > 0.5  # logits far from zero, so the comparison can fail
        torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-5, atol=1e-5)
    if kit.config.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_round_trip_through_hf_import(tmp_path: Path, changes: dict) -> None:
    kit = random_model(**changes)
    export_hf_checkpoint(kit, tmp_path)
    back, tokenizer = load_hf_checkpoint(tmp_path)
    assert tokenizer is None
    assert back.config.stack == kit.config.stack
    for field in ("vocab_size", "d_model", "n_heads", "kv_heads", "ffn_width", "rope_theta", "rope_scaling",
                  "norm_eps", "qkv_bias", "attn_out_bias", "tie_embeddings"):
        assert getattr(back.config, field) == getattr(kit.config, field), field
    original, loaded = kit.state_dict(), back.state_dict()
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(back(batch()), kit(batch()), rtol=0, atol=0)


def test_config_json_fields(tmp_path: Path) -> None:
    kit = random_model(**CASES["all"])
    export_hf_checkpoint(kit, tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    expected = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, mlp_bias=False,
        dtype="float32", max_position_embeddings=64 * 32, bos_token_id=None, eos_token_id=None,
    )
    assert {key: fields[key] for key in expected} == expected
    assert fields["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500.0, **LLAMA3}
    # Legacy keys with the same values, for transformers 4.x readers.
    assert fields["rope_theta"] == 500.0 and fields["rope_scaling"] == {"rope_type": "llama3", **LLAMA3}
    assert isinstance(fields["rope_parameters"]["original_max_position_embeddings"], int)
    # Tied: only the embedding is stored, as transformers' own save_pretrained does.
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    assert model_config_from_hf(llama_config_from_model_config(kit.config)).stack == kit.config.stack


def test_llama3_scaling_matters_for_the_parity_test(tmp_path: Path) -> None:
    # Guard against a vacuous llama3 case: the exported model without its scaling must differ.
    kit = random_model(**CASES["llama3-rope"])
    export_hf_checkpoint(kit, tmp_path)
    unscaled = random_model(**{**CASES["llama3-rope"], "rope_scaling": {}})
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (unscaled(batch()) - hf(batch()).logits).abs().max() > 1e-2


def test_dtype_of_written_weights(tmp_path: Path) -> None:
    kit = random_model(**CASES["tied"])
    export_hf_checkpoint(kit, tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert kit.embed.weight.dtype == torch.float32  # the model itself is unchanged
    back, _ = load_hf_checkpoint(tmp_path)
    torch.testing.assert_close(back.embed.weight, kit.embed.weight.bfloat16().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        export_hf_checkpoint(kit, tmp_path / "int", dtype=torch.int64)


def test_tokenizer_is_saved_and_reloads(tmp_path: Path) -> None:
    tokenizer = train_char([["hello world", "depth up-scaling, 42!"]])
    kit = random_model(vocab_size=len(tokenizer))
    export_hf_checkpoint(kit, tmp_path, tokenizer=tokenizer)
    sentence = "hello up-scaling world 24"
    back, reloaded = load_hf_checkpoint(tmp_path)
    assert reloaded is not None
    assert reloaded(sentence)["input_ids"] == tokenizer(sentence)["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path).decode(tokenizer.encode(sentence)) == sentence
    assert back.config.vocab_size == len(tokenizer)
    fields = json.loads((tmp_path / "config.json").read_text())
    assert fields["eos_token_id"] == tokenizer.eos_token_id == 0
    with pytest.raises(ValueError, match=f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is 5"):
        export_hf_checkpoint(random_model(vocab_size=5), tmp_path / "small", tokenizer=tokenizer)
    assert not (tmp_path / "small").exists()


# ---- refusals: one clear error, and nothing written ----


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(n_layers=3, memory_layers=[1], memory_branch="hml"),
         r"layers\[1\] is a memory block; only pure Llama models \(transformer blocks with ffn branches\)"),
        (dict(layers=[LayerSpec(), LayerSpec(), LayerSpec("transformer", "pkm")]),
         r"layers\[2\]\.branch='pkm' is not 'ffn'"),
        (dict(qkv_bias=True, attn_out_bias=False), "qkv_bias=True differs from attn_out_bias=False"),
        (dict(qkv_bias=False, attn_out_bias=True), "qkv_bias=False differs from attn_out_bias=True"),
    ],
    ids=["memory-block", "pkm-branch", "qkv-bias-only", "out-bias-only"],
)
def test_refuses_models_llama_cannot_express(tmp_path: Path, changes: dict, message: str) -> None:
    model = random_model(**changes)
    fresh, empty = tmp_path / "fresh", tmp_path / "empty"
    empty.mkdir()
    for directory in (fresh, empty):
        with pytest.raises(ValueError, match=message):
            export_hf_checkpoint(model, directory)
    assert not fresh.exists() and list(empty.iterdir()) == []


def test_existing_export_needs_overwrite(tmp_path: Path) -> None:
    first, second = random_model(seed=0), random_model(seed=1)
    export_hf_checkpoint(first, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a checkpoint \\(config.json\\); pass overwrite=True"):
        export_hf_checkpoint(second, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    # A stale shard index would be read instead of the new weights; overwrite removes it.
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    export_hf_checkpoint(second, tmp_path, overwrite=True)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(load_hf_checkpoint(tmp_path)[0](batch()), second(batch()), rtol=0, atol=0)


def test_directory_without_config_and_file_path(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    export_hf_checkpoint(random_model(), tmp_path)  # other files do not block an export
    assert (tmp_path / "notes.txt").is_file() and (tmp_path / "config.json").is_file()
    with pytest.raises(FileExistsError, match="notes.txt: is a file"):
        export_hf_checkpoint(random_model(), tmp_path / "notes.txt")


def test_untied_head_of_a_tied_config_is_refused(tmp_path: Path) -> None:
    model = random_model(**CASES["tied"])
    model.lm_head.weight = torch.nn.Parameter(model.embed.weight.detach() + 1)
    with pytest.raises(ValueError, match="tie_embeddings=True but lm_head.weight differs"):
        export_hf_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shared_block_modules_export(tmp_path: Path) -> None:
    # A block placed twice shares tensors; safetensors refuses shared memory unless copied.
    model = random_model(n_layers=3)
    model.blocks[2] = model.blocks[0]
    export_hf_checkpoint(model, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(batch()).logits, model(batch()), rtol=1e-5, atol=1e-5)

