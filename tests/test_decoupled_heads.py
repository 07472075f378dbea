"""MIDUS on decoupled heads (n_heads · head_dim ≠ d_model, Qwen3-0.6B and -4B), and coupled models unchanged.

A random Qwen3 of that shape (4 heads of 16 on a 32-wide stream: Attn' gives 64 channels) is
saved offline and imported; memory blocks are inserted by `upscale`. HML returns to d_model with
``memory.combine: sum`` (each head's HIVE projection P_h, or value rows, end in d_model and the
heads are summed); PKM and multi-head PKM project the 64-wide heads to their query. Checked:
identity at insertion (logits and greedy generation equal the base's), the memory block's Attn'
against Qwen3's own attention before o_proj, the branches' outputs against brute-force
references, that a few steps of training the inserted blocks lower the loss, the refusals, and
that a coupled model (every kit model, Llama-3.2, SmolLM2, Qwen2.5) builds and computes as before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_standins import randomised
from transformers import Qwen3Config, Qwen3ForCausalLM

from midus.checkpoint.hf_import import load_hf_checkpoint
from midus.model import MidusLM, ModelConfig
from midus.model.memory_block import MemoryBlock
from midus.model.retrieval.product_keys import brute_force_retrieval
from midus.upscale import UpscaleConfig, upscale
from midus.upscale.surgery import apply_trainable

VOCAB = 100
QWEN3 = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, head_dim=16,
    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
)
MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8}
INSERT_AFTER = [0, 1]  # T0 M T1 M T2: memory blocks at 1 (a copy of block 0's attention) and 3 (of block 1's)
SUM = {**MEMORY, "combine": "sum"}
SETTINGS = {
    "hml-hive": ("hml", SUM),
    "hml-per_head": ("hml", {**SUM, "values": "per_head"}),
    "hml-shared": ("hml", {**SUM, "values": "shared"}),
    "hml-hive-random-bank-zero-projections": ("hml", {**SUM, "zero_init_values": False, "zero_init_head_proj": True}),
    "pkm": ("pkm", MEMORY),
    "multihead_pkm": ("multihead_pkm", {**MEMORY, "pkm_heads": 2, "pkm_query_dim": 16}),
    "pkm-output-gate": ("pkm", {**MEMORY, "zero_init_values": False, "output_gate": True}),
}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Qwen3ForCausalLM, MidusLM]:
    """A random Qwen3 with decoupled heads, and its import into the kit."""
    directory = tmp_path_factory.mktemp("qwen3")
    torch.manual_seed(0)
    hf = randomised(Qwen3ForCausalLM(Qwen3Config(**QWEN3)).eval())
    hf.save_pretrained(directory)
    kit, _ = load_hf_checkpoint(Path(directory))
    assert (kit.config.d_model, kit.config.head_dim, kit.config.attention_width) == (32, 16, 64)
    return hf, kit.eval()


def midus(base: MidusLM, branch: str, memory: dict) -> tuple[MidusLM, list[int]]:
    model, inserted = upscale(base, UpscaleConfig(method="midus", positions=INSERT_AFTER, branch=branch, memory=memory))
    assert inserted == [1, 3] and all(isinstance(model.blocks[index], MemoryBlock) for index in inserted)
    return model.eval(), inserted


def tokens(time: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, time), generator=torch.Generator().manual_seed(seed))


# ---- identity at insertion ----


@pytest.mark.parametrize("setting", SETTINGS)
def test_inserted_memory_blocks_keep_the_base_function(qwen3, setting: str) -> None:
    hf, base = qwen3
    model, inserted = midus(base, *SETTINGS[setting])
    ids = tokens()
    heads_seen = []
    hooks = [model.blocks[i].attn.register_forward_hook(lambda m, a, out: heads_seen.append(out)) for i in inserted]
    with torch.no_grad():
        logits = model(ids)
        assert torch.equal(logits, base(ids))  # each memory block adds exactly zero
        torch.testing.assert_close(logits, hf(ids).logits, rtol=0, atol=1e-5)
    for hook in hooks:
        hook.remove()
    # The memory reads real queries: 64-wide heads, far from zero (so the identity is not vacuous).
    assert all(heads.shape == (2, 16, 64) and heads.abs().mean() > 0.01 for heads in heads_seen)
    prompt = tokens(5, seed=2)  # through the KV cache, the memory blocks' attention cached too
    assert torch.equal(model.generate(prompt, max_new_tokens=6), base.generate(prompt, max_new_tokens=6))


# ---- the memory block's Attn' is Qwen3's attention before o_proj ----


def test_memory_block_attention_is_qwen3_attention_without_o_proj(qwen3) -> None:
    hf, base = qwen3
    model, inserted = midus(base, "hml", SUM)
    ids = tokens()
    before_o_proj: dict[int, torch.Tensor] = {}
    hooks = [
        hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
            lambda module, args, layer=layer: before_o_proj.__setitem__(layer, args[0])
        )
        for layer in INSERT_AFTER
    ]
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states  # hidden[i]: the input of layer i
        for hook in hooks:
            hook.remove()
        rope = model.rotary(torch.arange(ids.shape[1]), torch.float32)
        for index, layer in zip(inserted, INSERT_AFTER):
            block = model.blocks[index]
            heads = block.attn(block.attn_norm(hidden[layer]), rope)  # Attn'(norm x): the a_h, concatenated
            assert heads.shape == (2, 16, 64) and block.attn.o_proj is None
            torch.testing.assert_close(heads, before_o_proj[layer], rtol=0, atol=1e-5)
            assert before_o_proj[layer].abs().mean() > 0.01


# ---- what the branches compute on 64-wide heads, against brute-force references ----


def random_values(model: MidusLM, index: int) -> None:
    """Give the memory of block `index` random values (and HIVE projections), as training would."""
    generator = torch.Generator().manual_seed(index)
    with torch.no_grad():
        for name, parameter in model.blocks[index].branch.named_parameters():
            if name.startswith(("values.", "head_proj")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("values", ["hive", "per_head", "shared"])
def test_hml_sums_heads_returned_to_d_model(qwen3, values: str) -> None:
    # combine: sum on decoupled heads: output = Σ_h o_h, o_h = Σ_i w_hi · U[slot_hi] · P_h (HIVE),
    # Σ_i w_hi · V_h[slot_hi] (per_head) or Σ_i w_hi · V[slot_hi] (shared); every o_h is d_model wide.
    _, base = qwen3
    model, _ = midus(base, "hml", {**SUM, "values": values})
    random_values(model, 1)
    branch = model.blocks[1].branch
    heads = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    weights, slots = brute_force_retrieval(branch.keys, heads.unflatten(-1, (4, 16)))  # (2, 5, H, k)
    table = branch.values.weight
    if values == "hive":
        latent = torch.einsum("bthk,bthkl->bthl", weights, table[slots])  # pool first ...
        expected = torch.einsum("bthl,hld->btd", latent, branch.head_proj)  # ... then project, sum heads
        assert branch.head_proj.shape == (4, 8, 32)
    else:
        rows = slots + torch.arange(4)[:, None] * 64 if values == "per_head" else slots
        expected = torch.einsum("bthk,bthkd->btd", weights, table[rows])
        assert table.shape == ((4 if values == "per_head" else 1) * 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(branch(heads), expected, rtol=0, atol=1e-5)
    assert expected.abs().mean() > 0.1


@pytest.mark.parametrize("branch_name", ["pkm", "multihead_pkm"])
def test_pkm_projects_the_heads_to_its_query(qwen3, branch_name: str) -> None:
    _, base = qwen3
    model, _ = midus(base, branch_name, {**MEMORY, "pkm_heads": 2})
    random_values(model, 1)
    branch = model.blocks[1].branch
    assert branch.query_proj.in_features == 64  # reads the concatenated heads, not d_model
    heads = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        queries = (heads @ branch.query_proj.weight.T).unflatten(-1, (branch.n_heads, -1))
        weights, slots = brute_force_retrieval(branch.keys, queries)
        expected = torch.einsum("bthk,bthkd->btd", weights, branch.values.weight[slots])
        torch.testing.assert_close(branch(heads), expected, rtol=0, atol=1e-5)


# ---- training the inserted blocks lowers the loss ----


@pytest.mark.parametrize("setting", ["hml-hive", "pkm"])
def test_training_the_memory_blocks_lowers_the_loss(qwen3, setting: str) -> None:
    _, base = qwen3
    model, inserted = midus(base, *SETTINGS[setting])
    model.train()
    apply_trainable(model, inserted, "new")  # only the memory blocks learn: the loss can only fall through them
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(24, seed=5)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert all(model.blocks[index].branch.values.weight.abs().sum() > 0 for index in inserted)


# ---- refusals: one error naming the branch and the field ----


@pytest.mark.parametrize(
    ("branch", "memory", "field"),
    [
        ("hml", MEMORY, "memory.combine='concat'"),
        ("hml", {**SUM, "attn_output_projection": True}, "memory.attn_output_projection=true"),
        ("hml", {**SUM, "internal_residual": True}, "memory.internal_residual=true"),
        ("pkm", {**MEMORY, "internal_residual": True}, "memory.internal_residual=true"),
    ],
    ids=["hml-concat", "hml-w_o", "hml-internal-residual", "pkm-internal-residual"],
)
def test_settings_that_cannot_read_decoupled_heads_are_refused(qwen3, branch: str, memory: dict, field: str) -> None:
    _, base = qwen3
    with pytest.raises(ValueError) as error:
        upscale(base, UpscaleConfig(method="midus", positions=INSERT_AFTER, branch=branch, memory=memory))
    message = str(error.value)
    assert message.startswith("model.upscale: ") and f"branch={branch!r}" in message and field in message
    assert "n_heads=4 · head_width=16 = 64 != d_model=32" in message
    # The model config alone says the same.
    with pytest.raises(ValueError, match=rf"layers\[1\]\.branch='{branch}' cannot read as set: {field}"):
        ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, head_width=16, n_layers=2, memory_layers=[1],
                    memory_branch=branch, memory=memory)


def test_attn_output_projection_is_fine_for_pkm(qwen3) -> None:
    # With W_O the heads come back to d_model before the branch: PKM's query reads that width.
    _, base = qwen3
    model, _ = midus(base, "pkm", {**MEMORY, "attn_output_projection": True})
    assert model.blocks[1].branch.query_proj.in_features == 32
    with torch.no_grad():
        assert torch.equal(model(tokens()), base(tokens()))


# ---- coupled models (n_heads · head_dim = d_model) build and compute exactly as before ----

# Recorded with the code before decoupled heads were supported (git 765ef3a): a digest of the
# state dict (names, shapes, bytes: the same parameters drawn in the same order) and, with random
# values, the memory block's output update = block(x) - x and the logits. The digest is exact; the
# outputs carry a float tolerance only so that another CPU's matmul rounding cannot fail them (at
# the change they were compared bit for bit).
COUPLED = {
    "hml-hive-concat": ("hml", {"values": "hive"}),
    "hml-hive-sum": ("hml", {"values": "hive", "combine": "sum"}),
    "hml-per_head-concat": ("hml", {"values": "per_head"}),
    "hml-shared-sum": ("hml", {"values": "shared", "combine": "sum"}),
    "hml-internal-residual": ("hml", {"internal_residual": True}),
    "hml-attn-output-projection": ("hml", {"attn_output_projection": True}),
    "pkm": ("pkm", {"query_norm": "layernorm"}),
    "multihead_pkm": ("multihead_pkm", {"pkm_heads": 2, "pkm_query_dim": 16}),
    "ffn": ("ffn", {}),
}
BEFORE = {
    "hml-hive-concat": {'state': 'a14962fa6beff87b', 'update': [-0.114019, 0.117023, -0.059892, -0.080132], 'update_abs_sum': 93.61682, 'logits': [1.547933, -0.04801, -1.690847, 2.046775], 'logits_abs_sum': 860.8228},  # noqa: E501
    "hml-hive-sum": {'state': 'b511f4a67c75e233', 'update': [0.079313, 0.547301, -0.41876, 0.239635], 'update_abs_sum': 213.62733, 'logits': [0.925716, -0.533128, -1.54196, -0.796237], 'logits_abs_sum': 821.7427},  # noqa: E501
    "hml-per_head-concat": {'state': '9835054617db2840', 'update': [-0.271908, 0.033747, -0.151505, 0.337712], 'update_abs_sum': 109.78638, 'logits': [0.06021, 2.018114, -1.507876, 1.19918], 'logits_abs_sum': 893.73},  # noqa: E501
    "hml-shared-sum": {'state': 'e1fe5d2ad48a824b', 'update': [0.113053, -0.275496, -0.043049, 0.368397], 'update_abs_sum': 114.55811, 'logits': [0.401936, 1.985766, -1.114963, 1.476394], 'logits_abs_sum': 897.1166},  # noqa: E501
    "hml-internal-residual": {'state': 'a14962fa6beff87b', 'update': [0.002304, -0.067191, -0.289089, 0.069055], 'update_abs_sum': 92.77343, 'logits': [1.402241, 0.010057, -1.322383, 2.129405], 'logits_abs_sum': 858.6377},  # noqa: E501
    "hml-attn-output-projection": {'state': '3c6ac0b0e9708fd0', 'update': [0.150123, 0.243577, -0.056382, -0.124535], 'update_abs_sum': 108.69934, 'logits': [0.426725, -0.77, -0.46662, -0.064435], 'logits_abs_sum': 878.6919},  # noqa: E501
    "pkm": {'state': 'f86d45bbac0b1012', 'update': [-0.050479, -0.08971, -0.056634, 0.007764], 'update_abs_sum': 54.17437, 'logits': [-1.71048, 1.417146, -0.202694, -1.149622], 'logits_abs_sum': 904.1654},  # noqa: E501
    "multihead_pkm": {'state': 'e671b4f2d7cfb741', 'update': [0.098493, -0.144796, 0.077111, 0.26448], 'update_abs_sum': 75.71995, 'logits': [-1.820994, 1.578198, -0.168131, -1.197628], 'logits_abs_sum': 902.6773},  # noqa: E501
    "ffn": {'state': '7e353a5a20894f9b', 'update': [0.41266, 1.228007, 1.731613, -1.27491], 'update_abs_sum': 572.38282, 'logits': [-0.51959, -1.323535, -0.823063, 0.539633], 'logits_abs_sum': 874.9123},  # noqa: E501
}


def state_digest(model: MidusLM) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("variant", COUPLED)
def test_coupled_memory_blocks_are_unchanged(variant: str) -> None:
    branch, memory = COUPLED[variant]
    torch.manual_seed(0)
    model = MidusLM(ModelConfig(
        vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, init_std=0.2, memory_layers=[1],
        memory_branch=branch, memory={"n_subkeys": 8, "topk": 4, "latent_dim": 8, "zero_init_values": False, **memory},
    )).eval()
    assert model.config.attention_width == model.config.d_model
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        update = model.blocks[1](x, model.rotary(torch.arange(12), x.dtype)) - x
        logits = model(ids)
    before = BEFORE[variant]
    assert state_digest(model) == before["state"]
    torch.testing.assert_close(update[0, -1, :4], torch.tensor(before["update"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, -1, :4], torch.tensor(before["logits"]), rtol=0, atol=1e-5)
    assert float(update.double().abs().sum()) == pytest.approx(before["update_abs_sum"], rel=1e-6)
    assert float(logits.double().abs().sum()) == pytest.approx(before["logits_abs_sum"], rel=1e-6)
