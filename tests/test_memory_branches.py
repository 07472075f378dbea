"""Memory branches and memory blocks inside the kit model: identity, causality, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from midus.model import LayerSpec, MidusLM, ModelConfig
from midus.model.memory_block import MemoryBlock

VOCAB = 40

# (memory block branch, memory settings): every branch and every HML value layout.
VARIANTS = {
    "hml-hive": ("hml", {"values": "hive"}),
    "hml-hive-sum": ("hml", {"values": "hive", "combine": "sum"}),
    "hml-per_head": ("hml", {"values": "per_head"}),
    "hml-shared-sum": ("hml", {"values": "shared", "combine": "sum"}),
    "hml-rmsnorm-residual": ("hml", {"query_norm": "rmsnorm", "internal_residual": True}),
    "pkm": ("pkm", {"query_norm": "layernorm"}),
    "multihead_pkm": ("multihead_pkm", {"pkm_heads": 2, "pkm_query_dim": 16}),
}


def memory_model(branch: str, memory: dict, seed: int = 0, **overrides) -> MidusLM:
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, init_std=0.2,
        memory_layers=[1], memory_branch=branch, memory={"n_subkeys": 8, "topk": 4, "latent_dim": 8, **memory},
    )
    fields.update(overrides)
    return MidusLM(ModelConfig(**fields)).eval()


def ids(batch: int = 2, time: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, time), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_initialised_memory_block_is_an_exact_identity(variant: str) -> None:
    model = memory_model(*VARIANTS[variant])
    block = model.blocks[1]
    assert isinstance(block, MemoryBlock)
    x = torch.randn(2, 12, 32)
    rope = model.rotary(torch.arange(12), x.dtype)
    assert torch.equal(block(x, rope), x)
    # And the whole model equals the same model without that block, bit for bit.
    base = MidusLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    state = {k.replace("blocks.2.", "blocks.1."): v for k, v in state.items()}
    base.load_state_dict(state)
    assert torch.equal(base(ids()), model(ids()))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", [0, 7])
def test_no_branch_lets_a_future_token_change_a_past_output(variant: str, t: int) -> None:
    branch, memory = VARIANTS[variant]
    model = memory_model(branch, {**memory, "zero_init_values": False})
    tokens = ids()
    changed = tokens.clone()
    changed[:, t] = (tokens[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t])
    assert (after[:, t] - before[:, t]).abs().max() > 1e-4


def test_pkm_as_the_branch_of_a_transformer_block_is_causal_too() -> None:
    torch.manual_seed(0)
    model = MidusLM(ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, init_std=0.2,
        layers=[LayerSpec("transformer", "pkm"), LayerSpec("transformer", "ffn")],
        memory={"n_subkeys": 8, "topk": 4, "zero_init_values": False, "query_norm": "layernorm"},
    )).eval()
    tokens = ids()
    changed = tokens.clone()
    changed[:, 5] = (tokens[:, 5] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :5], model(tokens)[:, :5])


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_queries_subkeys_and_values(variant: str) -> None:
    branch, memory = VARIANTS[variant]
    model = memory_model(branch, {**memory, "zero_init_values": False}).train()
    model(ids()).logsumexp(-1).mean().backward()
    memory_branch = model.blocks[1].branch
    for name, parameter in memory_branch.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # The queries: HML's are the attention heads, so the block's attention must learn from the memory.
    assert model.blocks[1].attn.q_proj.weight.grad.abs().sum() > 0


def test_zero_initialised_values_move_first_then_keys_learn() -> None:
    model = memory_model("hml", {"values": "hive"}).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    keys = model.blocks[1].branch.keys.subkeys
    model(ids()).logsumexp(-1).mean().backward()
    assert model.blocks[1].branch.values.weight.grad.abs().sum() > 0
    assert keys.grad.abs().sum() == 0  # values are zero: the retrieval weights do not matter yet
    optimizer.step()
    optimizer.zero_grad()
    model(ids()).logsumexp(-1).mean().backward()
    assert keys.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["hml-hive", "pkm"])
def test_cached_decoding_through_memory_blocks_matches_the_full_forward(variant: str) -> None:
    branch, memory = VARIANTS[variant]
    model = memory_model(branch, {**memory, "zero_init_values": False})
    tokens = ids(time=10)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 10)
        pieces = [model(tokens[:, :6], cache, 0)] + [model(tokens[:, i : i + 1], cache, i) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_memory_layers_place_memory_blocks_and_state_dict_keys_prove_it() -> None:
    model = memory_model("hml", {}, n_layers=4, memory_layers=[1, 3])
    kinds = [type(block).__name__ for block in model.blocks]
    assert kinds == ["TransformerBlock", "MemoryBlock", "TransformerBlock", "MemoryBlock"]
    keys = model.state_dict().keys()
    assert {k.split(".")[1] for k in keys if ".branch.values." in k} == {"1", "3"}
    assert not any(k.startswith(("blocks.1.attn.o_proj", "blocks.3.attn.o_proj")) for k in keys)
    assert model.config.stack[1] == LayerSpec("memory", "hml")
    # The same stack written out as explicit layers builds the same model.
    explicit = ModelConfig(**{**vars(model.config), "memory_layers": [], "layers": model.config.stack})
    assert MidusLM(explicit).state_dict().keys() == keys


def test_hive_parameter_count_follows_the_method() -> None:
    # keys H·n·d_h + bank N·d_l + projections H·d_l·d_h (method notes, HIVE section).
    # (query_norm none: the method's count; rmsnorm adds a gain per head and half, H·d_h.)
    model = memory_model("hml", {"values": "hive", "n_subkeys": 8, "latent_dim": 8, "query_norm": "none"})
    heads, head_dim, n, latent = 4, 8, 8, 8
    assert model.num_memory_parameters() == heads * n * head_dim + n * n * latent + heads * latent * head_dim
    per_head = memory_model("hml", {"values": "per_head", "query_norm": "none"})
    assert per_head.num_memory_parameters() == heads * n * head_dim + heads * n * n * head_dim


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"memory": {"n_subkeys": 8, "topk": 9}}, r"memory.topk=9 is larger than memory.n_subkeys=8"),
        ({"memory": {"pkm_query_dim": 15}}, r"memory.pkm_query_dim=15 cannot be split into two halves"),
        ({"memory": {"latent_dim": 0}}, r"memory.latent_dim must be positive"),
        ({"memory_layers": [3]}, r"memory_layers\[0\]=3 is not a layer index; the model has n_layers=3"),
        ({"memory_branch": "hmm"}, r"memory_branch='hmm' is not a registered branch"),
        ({"branch": "hml"}, r"layers\[0\].branch='hml' queries with the attention heads' outputs"),
        (
            {"layers": [{"block": "memory", "branch": "hml"}], "memory_layers": [0]},
            r"with an explicit `layers` list, set block: memory on those entries instead",
        ),
    ],
)
def test_memory_config_errors_name_the_field(fields: dict, message: str) -> None:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **fields})
