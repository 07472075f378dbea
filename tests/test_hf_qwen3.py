"""Qwen3 as an imported family: per-head q/k norms, a head_dim decoupled from d_model, up-scaling
with DUS and MIDUS, and the export of DUS results back to `Qwen3ForCausalLM`.

Every fixture is a tiny random transformers model saved offline into `tmp_path`; parity is
checked in float32 against transformers' own forward and `generate`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_hf_import import save_random as save_random_model
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from midus.checkpoint.hf_export import export_hf_checkpoint, llama_config_from_model_config
from midus.checkpoint.hf_import import load_hf_checkpoint, model_config_from_hf
from midus.checkpoint.kit import MODEL_CONFIG_KEY, model_from_checkpoint
from midus.model import MidusLM, ModelConfig
from midus.upscale import UpscaleConfig, upscale

VOCAB = 100
# head_dim 16 = hidden/heads; DECOUPLED sets 32, so q/k/v/o are 128 wide on a 64-wide stream.
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=128, max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
)
DECOUPLED = dict(TINY, head_dim=32)
MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8}
PARITY_CASES = {
    "untied": dict(TINY),
    "tied-decoupled-head_dim": dict(DECOUPLED, tie_word_embeddings=True),
    "untied-decoupled-head_dim-mha": dict(DECOUPLED, num_key_value_heads=4),
    "attention_bias": dict(TINY, attention_bias=True),
}


def save_random(config: Qwen3Config, directory: Path) -> PreTrainedModel:
    """A random Qwen3ForCausalLM saved to `directory` (every tensor randomised, q/k norm gains too)."""
    return save_random_model(Qwen3ForCausalLM, config, directory)


def batch(time: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, time), generator=torch.Generator().manual_seed(1))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---- import: logits and greedy generation equal transformers' ----


@pytest.mark.parametrize("fields", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_logits_match_transformers(tmp_path: Path, fields: dict) -> None:
    hf = save_random(Qwen3Config(**fields), tmp_path)
    kit, _ = load_hf_checkpoint(tmp_path)
    assert kit.config.qk_norm and kit.config.head_dim == fields["head_dim"]
    assert kit.blocks[0].attn.q_norm.weight.shape == (fields["head_dim"],)
    with torch.no_grad():
        expected = hf(batch()).logits
        assert expected.std() > 0.3  # far from zero, so the comparison can fail
        assert max_abs_diff(kit(batch()), expected) <= 1e-5
    if fields.get("tie_word_embeddings"):
        assert kit.lm_head.weight is kit.embed.weight


def test_qk_norms_matter_for_the_parity_test(tmp_path: Path) -> None:
    # Guard against a vacuous parity: the same weights without the q/k norms must differ.
    hf = save_random(Qwen3Config(**DECOUPLED), tmp_path)
    kit, _ = load_hf_checkpoint(tmp_path)
    for block in kit.blocks:
        block.attn.q_norm, block.attn.k_norm = None, None
    with torch.no_grad():
        assert max_abs_diff(kit(batch()), hf(batch()).logits) > 1e-2


def test_greedy_generation_matches_transformers(tmp_path: Path) -> None:
    hf = save_random(Qwen3Config(**DECOUPLED), tmp_path)
    kit, _ = load_hf_checkpoint(tmp_path)
    prompt = batch(7)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert torch.equal(kit.generate(prompt, max_new_tokens=10), expected)


def test_decoupled_head_dim_through_the_kv_cache() -> None:
    # A chunked prefill and one-token steps read the (batch, kv_heads, time, head_dim) cache.
    torch.manual_seed(0)
    model = MidusLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, head_width=16,
                                qk_norm=True, init_std=0.2)).eval()
    ids = batch(12)
    with torch.no_grad():
        cache = model.new_cache(2, 12)
        pieces = [model(ids[:, :5], cache, 0), model(ids[:, 5:9], cache, 5)]
        pieces += [model(ids[:, i : i + 1], cache, i) for i in range(9, 12)]
        assert cache.keys[0].shape == (2, 2, 12, 16)
        torch.testing.assert_close(torch.cat(pieces, 1), model(ids), rtol=0, atol=1e-5)


# ---- config mapping and refusals ----


def test_qwen3_0_6b_shape_maps_to_a_decoupled_head_width() -> None:
    config = model_config_from_hf(Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ))
    assert (config.d_model, config.n_heads, config.kv_heads, config.head_width) == (1024, 16, 8, 128)
    assert (config.head_dim, config.attention_width, config.rope_theta) == (128, 2048, 1e6)
    assert config.qk_norm and config.tie_embeddings and not config.qkv_bias and not config.attn_out_bias
    # head_dim = hidden/heads keeps the kit's default, so round-tripped configs compare equal.
    assert model_config_from_hf(Qwen3Config(**TINY)).head_width == 0


def test_default_fields_keep_parameters_and_state_dict_names() -> None:
    fields = dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2)
    torch.manual_seed(0)
    default = MidusLM(ModelConfig(**fields)).state_dict()
    torch.manual_seed(0)
    explicit = MidusLM(ModelConfig(**fields, head_width=16, qk_norm=False)).state_dict()
    assert default.keys() == explicit.keys() and not any("q_norm" in name for name in default)
    assert all(torch.equal(default[name], explicit[name]) for name in default)


def test_kit_checkpoint_keeps_head_width_and_qk_norm(tmp_path: Path) -> None:
    # A kit .ckpt stores the config as plain data; the new fields must come back with it.
    save_random(Qwen3Config(**DECOUPLED), tmp_path)
    kit, _ = load_hf_checkpoint(tmp_path)
    checkpoint = {
        MODEL_CONFIG_KEY: dataclasses.asdict(kit.config),
        "state_dict": {f"model.{name}": tensor for name, tensor in kit.state_dict().items()},
    }
    back = model_from_checkpoint(checkpoint, "in-memory").eval()
    assert back.config == kit.config
    with torch.no_grad():
        torch.testing.assert_close(back(batch()), kit(batch()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(head_width=15), "head_width=15 must be even"),
        (dict(head_width=-2), "head_width must be 0"),
        (dict(head_width=32, n_layers=3, memory_layers=[1]),
         r"layers\[1\] is a memory block, which needs n_heads · head_dim = d_model; got n_heads=4 · head_width=32"),
    ],
    ids=["odd", "negative", "memory-block"],
)
def test_head_width_errors_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=VOCAB, d_model=64, n_heads=4, **fields)


def write_config(directory: Path, **changes: object) -> Path:
    """A Qwen3 config.json only (no weights): a feature error must come before the weight lookup."""
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**Qwen3Config(**TINY).to_dict(), **changes}))
    return directory


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(use_sliding_window=True, sliding_window=16, max_window_layers=0, layer_types=None),
         "use_sliding_window=true"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope_type 'yarn'"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
         "partial_rotary_factor=0.5 is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    ],
    ids=["sliding-window", "yarn", "partial-rotary", "gelu"],
)
def test_unsupported_features_fail_before_weights(tmp_path: Path, changes: dict, message: str) -> None:
    write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        load_hf_checkpoint(tmp_path)


def test_harmless_sliding_windows_are_accepted() -> None:
    # As for Qwen2: a window without use_sliding_window, or one no layer is marked for, masks nothing.
    assert model_config_from_hf(Qwen3Config(**TINY, use_sliding_window=False, sliding_window=16)).n_layers == 2
    unused = Qwen3Config(**TINY, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert unused.layer_types == ["full_attention"] * 2
    assert model_config_from_hf(unused).n_layers == 2


# ---- up-scaling an imported Qwen3: identity at insertion ----


@pytest.fixture
def imported(tmp_path: Path) -> MidusLM:
    save_random(Qwen3Config(**dict(TINY, num_hidden_layers=4)), tmp_path / "qwen3")
    return load_hf_checkpoint(tmp_path / "qwen3")[0]


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "dus_interleave", "every": 2},
        {"method": "midus", "every": 2, "memory": MEMORY},
        {"method": "midus", "positions": [0, 2], "branch": "pkm", "memory": MEMORY},
    ],
    ids=["dus_interleave", "midus-hml", "midus-pkm"],
)
def test_upscaling_a_qk_norm_model_keeps_its_logits(imported: MidusLM, settings: dict) -> None:
    model, inserted = upscale(imported, UpscaleConfig(**settings))
    assert inserted and model.config.qk_norm
    for index in inserted:  # the copied attention brings its q/k norms along
        source = imported.blocks[index - 1 - inserted.index(index)]
        assert torch.equal(model.blocks[index].attn.q_norm.weight, source.attn.q_norm.weight)
        assert torch.equal(model.blocks[index].attn.k_norm.weight, source.attn.k_norm.weight)
        assert not torch.equal(source.attn.q_norm.weight, torch.ones_like(source.attn.q_norm.weight))
    ids = batch(12)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), imported(ids), rtol=0, atol=1e-6)
        cache = model.new_cache(2, 12)
        pieces = [model(ids[:, :8], cache, 0)] + [model(ids[:, i : i + 1], cache, i) for i in range(8, 12)]
        torch.testing.assert_close(torch.cat(pieces, 1), imported(ids), rtol=0, atol=1e-5)


def test_midus_on_a_decoupled_head_dim_is_refused_clearly(tmp_path: Path) -> None:
    save_random(Qwen3Config(**DECOUPLED), tmp_path)
    kit, _ = load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"memory block, which needs n_heads · head_dim = d_model"):
        upscale(kit, UpscaleConfig(method="midus", every=1, memory=MEMORY))


# ---- export of DUS results back to Qwen3ForCausalLM ----


def trained_copies(model: MidusLM, inserted: list[int]) -> MidusLM:
    """Give zeroed copies non-zero output projections, as continued training would: only then do
    the inserted blocks (and their cache slots) change what the exported model computes."""
    torch.manual_seed(1)
    with torch.no_grad():
        for index in inserted:
            for projection in (model.blocks[index].attn.o_proj, model.blocks[index].branch.down_proj):
                projection.weight.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize(
    ("fields", "settings"),
    [
        (dict(DECOUPLED, num_hidden_layers=3), {"method": "dus_interleave", "every": 1}),
        (dict(TINY, num_hidden_layers=3, tie_word_embeddings=True, attention_bias=True),
         {"method": "dus_solar", "drop": 1}),
    ],
    ids=["interleave-decoupled-head_dim", "solar-tied-bias"],
)
def test_dus_result_exports_to_qwen3(
    tmp_path: Path, fields: dict, settings: dict, transformers_warnings: list[str]
) -> None:
    save_random(Qwen3Config(**fields), tmp_path / "base")
    base, _ = load_hf_checkpoint(tmp_path / "base")
    model, inserted = upscale(base, UpscaleConfig(**settings))
    if settings["method"] == "dus_interleave":
        trained_copies(model, inserted)
    model.eval()
    depth = model.config.depth
    export_hf_checkpoint(model, tmp_path / "export")
    transformers_warnings.clear()  # only what loading the export logs counts

    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])
    assert written["num_hidden_layers"] == depth and written["layer_types"] == ["full_attention"] * depth
    assert written["head_dim"] == fields["head_dim"] and written["use_sliding_window"] is False
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32, output_loading_info=True)
    hf.eval()
    assert isinstance(hf, Qwen3ForCausalLM) and not any(info.values()), info
    assert transformers_warnings == []
    assert [layer.self_attn.layer_idx for layer in hf.model.layers] == list(range(depth))
    ids = batch()
    with torch.no_grad():
        expected = model(ids)
        assert max_abs_diff(hf(ids).logits, expected) <= 1e-5
    prompt = batch(6)
    mask = torch.ones_like(prompt)
    cached = hf.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = hf.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(model.generate(prompt, max_new_tokens=8), cached)
    # And back into the kit: the same tensors and config.
    back, _ = load_hf_checkpoint(tmp_path / "export")
    assert back.config.stack == model.config.stack
    assert (back.config.head_dim, back.config.qk_norm) == (model.config.head_dim, True)
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_export_refusals_name_the_family(tmp_path: Path, imported: MidusLM) -> None:
    midus_model, _ = upscale(imported, UpscaleConfig(method="midus", every=2, memory=MEMORY))
    with pytest.raises(ValueError, match=r"layers\[2\] is a memory block; only pure Qwen3 models"):
        export_hf_checkpoint(midus_model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="qk_norm=True: Llama has no query/key norms"):
        llama_config_from_model_config(imported.config)
