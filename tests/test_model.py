"""The kit model on its own: causality, KV cache, generation, GQA, tying, config errors."""

from __future__ import annotations

import pytest
import torch

from midus.model import LayerSpec, MidusLM, ModelConfig

VOCAB = 50



def tiny_model(seed: int = 0, **overrides: object) -> MidusLM:
    """A 2-layer random model, eval mode; init_std is raised so logits are far from ties."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2)
    fields.update(overrides)
    return MidusLM(ModelConfig(**fields)).eval()


def random_ids(batch: int, time: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, time), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [0, 5, 11])
def test_changing_a_token_never_changes_earlier_logits(t: int) -> None:
    model = tiny_model()
    ids = random_ids(2, 12)
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t])
    # Positions t.. see the change (otherwise the check above would prove nothing).
    assert not torch.allclose(after[:, t:], before[:, t:])
    assert (after[:, t] - before[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_chunked_prefill_and_decoding_match_full_forward(n_kv_heads: int) -> None:
    model = tiny_model(n_kv_heads=n_kv_heads)
    ids = random_ids(2, 16)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        # A prefill from 0, a chunk after cached positions, then single tokens: all three paths.
        pieces = [model(ids[:, :5], cache, 0), model(ids[:, 5:11], cache, 5)]
        pieces += [model(ids[:, i : i + 1], cache, i) for i in range(11, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_cache_refuses_to_overflow() -> None:
    model = tiny_model()
    cache = model.new_cache(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="holds 4 positions"):
        model(random_ids(1, 5), cache, 0)


def naive_greedy(model: MidusLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


def test_greedy_generate_matches_no_cache_argmax_loop() -> None:
    model = tiny_model()
    prompt = random_ids(3, 6)
    out = model.generate(prompt, max_new_tokens=10)
    assert out.shape == (3, 16)
    assert torch.equal(out, naive_greedy(model, prompt, 10))


def test_sampling_is_reproducible_and_top_k_1_is_greedy() -> None:
    model = tiny_model()
    prompt = random_ids(2, 4)

    def sample(seed: int, **kwargs: object) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate(prompt, max_new_tokens=12, temperature=1.0, generator=generator, **kwargs)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))  # the seed matters (12 draws from 50 tokens)
    assert torch.equal(sample(3, top_k=1), model.generate(prompt, max_new_tokens=12))


def test_generation_stops_after_eos() -> None:
    model = tiny_model()
    prompt = random_ids(1, 4)
    first = int(model.generate(prompt, max_new_tokens=1)[0, -1])
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=first)
    assert out.shape == (1, 5)  # stopped as soon as every sequence had emitted eos


def test_grouped_kv_heads_have_smaller_projections() -> None:
    model = tiny_model(n_heads=4, n_kv_heads=2)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (32, 32)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * 8, 32)
    assert model.new_cache(1, 3).keys[0].shape == (1, 2, 3, 8)


def test_tied_embeddings_share_one_matrix_counted_once() -> None:
    tied, untied = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert tied.num_parameters() == untied.num_parameters() - VOCAB * 32
    assert tied.num_parameters() == sum(p.numel() for p in set(tied.parameters()))
    # Tied is still a working model (and the output head moves with the embedding).
    with torch.no_grad():
        tied.embed.weight[3].zero_()
        assert torch.all(tied(random_ids(1, 4))[..., 3] == 0)


def test_num_parameters_trainable_only() -> None:
    model = tiny_model()
    model.embed.weight.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) == model.num_parameters() - VOCAB * 32


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(d_model=30, n_heads=4), "n_heads=4 must divide d_model=30"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
        (dict(branch="nope"), "branch='nope' is not a registered branch"),
        (dict(layers=[LayerSpec(branch="ffn"), LayerSpec(branch="nope")]), r"layers\[1\]\.branch='nope'"),
        (dict(layers=[{"branch": "nope"}]), r"layers\[0\]\.branch='nope'"),
        (dict(d_model=24, n_heads=8), "head_dim=d_model/n_heads=3 must be even"),
    ],
)
def test_config_errors_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=VOCAB, **fields)


def test_building_a_model_needs_a_vocabulary() -> None:
    config = ModelConfig()  # vocab_size defaults to 0: the CLI links it from the tokenizer
    with pytest.raises(ValueError, match="vocab_size must be positive"):
        MidusLM(config)


def test_explicit_layers_set_the_depth() -> None:
    config = ModelConfig(vocab_size=VOCAB, n_layers=7, layers=[LayerSpec(), LayerSpec()])
    assert config.depth == 2 and len(MidusLM(config).blocks) == 2


def test_config_fields_keep_what_the_user_wrote() -> None:
    # jsonargparse reads defaults back from a config instance: derived values must not be
    # stored in the fields, or an n_layers override of a default config would be ignored.
    config = ModelConfig(d_model=96, n_layers=3, n_heads=4)
    assert (config.n_kv_heads, config.ffn_hidden, config.layers) == (0, 0, [])
    assert (config.kv_heads, config.ffn_width, config.depth) == (4, 256, 3)
    assert ModelConfig(**vars(config)) == config
