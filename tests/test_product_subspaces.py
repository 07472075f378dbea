"""Product keys over p ≥ 2 sub-spaces (``memory.n_subspaces``): exact top-k against a brute-force
search over all nᵖ slots, gradients, the generalised shortlist pruning, every branch at p = 3, the
config checks, and p = 2 bit for bit the two-halves code it generalises."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from midus.model import LayerSpec, MidusLM, ModelConfig
from midus.model.memory_config import MemoryConfig
from midus.model.retrieval.ops import kept_subkey_scores
from midus.model.retrieval.product_keys import (
    ProductKeys,
    brute_force_retrieval,
    sorted_pair_candidates,
    sorted_tuple_candidates,
    subkey_scores,
    top_subkey_scores,
)
from midus.model.retrieval.slot_usage import SlotUsageTracker
from midus.model.retrieval.value_lookup import weighted_row_sum

BIT_FOR_BIT = dict(rtol=0, atol=0)


def in_slot_order(weights: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    slots, order = slots.sort(-1)
    return weights.gather(-1, order), slots


# --- the shortlist pruning ---


@pytest.mark.parametrize(("k", "parts"), [(1, 2), (7, 2), (16, 2), (5, 3), (16, 3), (12, 4)])
def test_tuple_candidates_are_exactly_the_dominance_bound(k: int, parts: int) -> None:
    candidates = sorted_tuple_candidates(k, parts)
    expected = [t for t in itertools.product(range(k), repeat=parts) if math.prod(i + 1 for i in t) <= k]
    assert candidates.shape == (parts, len(expected))
    assert [tuple(column) for column in candidates.T.tolist()] == expected  # lexicographic, none missing or extra


def test_two_part_candidates_are_the_pair_candidates_in_their_order() -> None:
    rows, cols = sorted_pair_candidates(32)
    assert torch.equal(sorted_tuple_candidates(32, 2), torch.stack([rows, cols]))


# --- exact retrieval: the brute force over all n^p slots ---


@pytest.mark.parametrize(
    ("parts", "heads", "query_dim", "n_subkeys", "topk", "query_norm", "key_norm"),
    [
        (2, 2, 8, 9, 4, "none", "none"),
        (3, 1, 9, 6, 5, "none", "none"),
        (3, 3, 12, 5, 5, "rmsnorm", "none"),
        (3, 2, 6, 7, 1, "layernorm", "layernorm"),
        (4, 2, 8, 4, 4, "rmsnorm", "rmsnorm"),
    ],
)
def test_retrieval_matches_brute_force_over_all_slots(parts, heads, query_dim, n_subkeys, topk, query_norm,
                                                      key_norm) -> None:
    torch.manual_seed(0)
    keys = ProductKeys(heads, query_dim, n_subkeys, topk, query_norm, key_norm=key_norm, n_subspaces=parts)
    if keys.query_norm is not None:  # non-trivial gains, so the norm's parameters matter
        torch.nn.init.uniform_(keys.query_norm.weight, 0.5, 1.5)
    assert keys.subkeys.shape == (heads, parts, n_subkeys, query_dim // parts) and keys.n_slots == n_subkeys**parts
    queries = torch.randn(3, 40, heads, query_dim)
    weights, slots = in_slot_order(*keys(queries))
    expected_weights, expected_slots = in_slot_order(*brute_force_retrieval(keys, queries))
    assert slots.shape == (3, 40, heads, topk) and 0 <= slots.min() and slots.max() < n_subkeys**parts
    assert torch.equal(slots, expected_slots)
    torch.testing.assert_close(weights, expected_weights)


def test_brute_force_slot_index_is_the_mixed_radix_of_the_sub_key_rows() -> None:
    # Independent of the brute force's own broadcasting: score every (a, b, c) by hand.
    torch.manual_seed(1)
    keys = ProductKeys(1, 6, 4, 3, "none", n_subspaces=3)
    query = torch.randn(1, 6)
    parts, subkeys = query.view(3, 2), keys.subkeys.detach()
    score = {
        a * 16 + b * 4 + c: float(sum(parts[j] @ subkeys[0, j, row] for j, row in enumerate((a, b, c))))
        for a, b, c in itertools.product(range(4), repeat=3)
    }
    best = sorted(score, key=score.get, reverse=True)[:3]
    _, slots = keys(query)
    assert sorted(slots[0].tolist()) == sorted(best)


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_gradients_to_queries_sub_keys_and_norm_equal_the_brute_force(parts: int) -> None:
    torch.manual_seed(0)
    keys = ProductKeys(2, 12, 4 if parts > 2 else 8, 4, "rmsnorm", n_subspaces=parts).double()
    torch.nn.init.uniform_(keys.query_norm.weight, 0.5, 1.5)
    queries = torch.randn(5, 7, 2, 12, dtype=torch.float64, requires_grad=True)
    table = torch.randn(keys.n_slots, 3, dtype=torch.float64)
    inputs = (queries, keys.subkeys, keys.query_norm.weight)
    grads = []
    for retrieve in (keys, lambda q: brute_force_retrieval(keys, q)):
        weights, slots = retrieve(queries)
        loss = weighted_row_sum(table, slots, weights.double()).pow(2).sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for got, expected in zip(*grads):
        assert expected.abs().sum() > 0
        # The retrieval weights are a float32 softmax in both: agreement to float32 rounding.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_three_part_subkey_scores_op_passes_opcheck_and_gradcheck() -> None:
    generator = torch.Generator().manual_seed(3)
    halves = torch.randn(5, 2, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    subkeys = torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    torch.library.opcheck(kept_subkey_scores, (subkey_scores(halves, subkeys).detach(), halves, subkeys, 3))
    assert torch.autograd.gradcheck(lambda h, s: top_subkey_scores(h, s, 3)[0], (halves, subkeys))


# --- p = 2 is the two-halves code, bit for bit ---


def two_halves_forward(self: ProductKeys, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ProductKeys.forward` as it was before ``n_subspaces`` (two halves, pair candidates), verbatim."""
    pair_i, pair_j = (index.to(queries.device) for index in sorted_pair_candidates(self.topk))
    top, sub_index = top_subkey_scores(self.query_halves(queries), self.scored_subkeys(), self.topk)
    s1, s2 = top.unbind(-2)
    pair_scores = s1.index_select(-1, pair_i) + s2.index_select(-1, pair_j)
    best, pair = pair_scores.topk(self.topk, dim=-1, sorted=False)
    a = sub_index[..., 0, :].gather(-1, pair_i[pair])
    b = sub_index[..., 1, :].gather(-1, pair_j[pair])
    slots = a * self.n_subkeys + b
    return torch.softmax(best.float() * self.score_scale, dim=-1), slots


def logits_and_gradients(model: MidusLM, ids: torch.Tensor, run=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of `run` (default: `model`, else e.g. its compiled form) and the gradients of `model`'s parameters."""
    model.zero_grad()
    logits = (model if run is None else run)(ids)
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("branch", ["hml", "pkm"])
def test_default_two_sub_spaces_are_the_two_halves_code_bit_for_bit(monkeypatch, branch: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, memory_layers=[1],
                         memory_branch=branch,
                         memory={"n_subkeys": 8, "topk": 4, "latent_dim": 8, "zero_init_values": False})
    assert config.memory.n_subspaces == 2 and config.memory.n_slots == 64
    model = MidusLM(config)
    keys = model.blocks[1].branch.keys
    head_width = 8 if branch == "hml" else 32
    heads = 4 if branch == "hml" else 1
    # The checkpoint layout of two halves: parameter names and shapes unchanged.
    assert keys.subkeys.shape == (heads, 2, 8, head_width // 2)
    assert keys.query_norm.weight.shape == (heads, 2, head_width // 2)
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    new_logits, new_grads = logits_and_gradients(model, ids)
    monkeypatch.setattr(ProductKeys, "forward", two_halves_forward)
    old_logits, old_grads = logits_and_gradients(model, ids)
    torch.testing.assert_close(new_logits, old_logits, **BIT_FOR_BIT)
    assert new_grads.keys() == old_grads.keys() and "blocks.1.branch.keys.subkeys" in new_grads
    for name, grad in old_grads.items():
        torch.testing.assert_close(new_grads[name], grad, **BIT_FOR_BIT, msg=lambda m, n=name: f"{n}: {m}")


# --- every branch at p = 3 ---


def three_part_model(branch: str, **memory) -> MidusLM:
    # d 48, 4 heads of 12: the heads and the 48-wide PKM queries split into 3 parts of 4 (and in halves).
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=40, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, memory_layers=[1], memory_branch=branch,
        memory={"n_subkeys": 5, "topk": 4, "latent_dim": 8, "zero_init_values": False, "n_subspaces": 3, **memory},
    )
    return MidusLM(config)


@pytest.mark.parametrize(
    ("branch", "memory", "value_rows"),
    [("hml", {"values": "hive"}, 125), ("hml", {"values": "per_head"}, 4 * 125), ("hml", {"values": "shared"}, 125),
     ("hml", {"values": "hive", "combine": "sum"}, 125), ("pkm", {}, 125), ("multihead_pkm", {"pkm_heads": 2}, 125)],
    ids=["hml-hive", "hml-per_head", "hml-shared", "hml-sum", "pkm", "multihead_pkm"],
)
def test_every_branch_retrieves_and_trains_over_three_sub_spaces(branch: str, memory: dict, value_rows: int) -> None:
    model = three_part_model(branch, **memory)
    memory_branch = model.blocks[1].branch
    keys = memory_branch.keys
    heads = {"hml": 4, "pkm": 1, "multihead_pkm": 2}[branch]
    width = 12 if branch == "hml" else 48
    assert keys.subkeys.shape == (heads, 3, 5, width // 3) and keys.n_slots == 125
    assert memory_branch.values.weight.shape[0] == value_rows
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    seen = []
    handle = keys.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with SlotUsageTracker(model) as tracker:
        logits, grads = logits_and_gradients(model, ids)
    handle.remove()
    # The branch read exactly what a search over all 125 slots of each head finds.
    weights, slots = in_slot_order(*keys(seen[0]))
    expected_weights, expected_slots = in_slot_order(*brute_force_retrieval(keys, seen[0]))
    assert torch.equal(slots, expected_slots)
    torch.testing.assert_close(weights, expected_weights)
    assert torch.isfinite(logits).all()
    for name in ("blocks.1.branch.keys.subkeys", "blocks.1.branch.values.weight"):
        assert grads[name].abs().sum() > 0, name
    metrics = tracker.stop()
    reads = tracker.usages["1"].counts.view(heads, 125).sum(-1)
    assert reads.tolist() == [2 * 10 * 4] * heads  # every token's k reads counted among the 125 slots of its head
    assert 0 < metrics["memory/1/usage"] <= 1 and 0 <= metrics["memory/1/kl_uniform"] <= math.log(125)


def test_three_sub_spaces_compile_as_one_graph_with_eager_results() -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=40, d_model=48, n_heads=4, n_kv_heads=2,
        memory={"n_subkeys": 5, "topk": 4, "latent_dim": 8, "zero_init_values": False, "n_subspaces": 3},
        layers=[LayerSpec("transformer", "ffn"), LayerSpec("memory", "hml"), LayerSpec("memory", "pkm")],
    )
    model = MidusLM(config)
    ids = torch.randint(0, 40, (2, 10))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fails on any graph break
    eager_logits, eager_grads = logits_and_gradients(model, ids)
    compiled_logits, compiled_grads = logits_and_gradients(model, ids, compiled)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# --- the config ---


def test_n_slots_follow_the_sub_spaces() -> None:
    assert MemoryConfig(n_subkeys=16, n_subspaces=3).n_slots == 4096 == MemoryConfig(n_subkeys=64).n_slots


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"memory": {"n_subspaces": 1}}, r"memory.n_subspaces must be at least 2 .* got 1"),
        # d 32, 4 heads of 8: HML's queries do not split in 3.
        ({"memory": {"n_subspaces": 3}, "memory_layers": [1], "memory_branch": "hml"},
         r"layers\[1\].branch='hml': memory.n_subspaces=3 does not split the queries \(head_dim=8\)"),
        ({"memory": {"n_subspaces": 3}, "memory_layers": [1], "memory_branch": "pkm"},
         r"layers\[1\].branch='pkm': memory.n_subspaces=3 does not split the queries \(memory.pkm_query_dim=32\)"),
        ({"memory": {"n_subspaces": 3, "n_subkeys": 4, "topk": 5}},
         r"memory.topk=5 is larger than memory.n_subkeys=4"),
    ],
)
def test_bad_sub_spaces_are_refused_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, **fields)


def test_a_query_width_that_splits_is_accepted_whatever_the_model_width() -> None:
    # PKM's own query width decides (96 = 3 × 32), not d_model; HML reads no pkm_query_dim.
    config = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, memory_layers=[1], memory_branch="pkm",
                         memory={"n_subspaces": 3, "pkm_query_dim": 96, "n_subkeys": 4, "topk": 4})
    assert MidusLM(config).blocks[1].branch.keys.subkeys.shape == (1, 3, 4, 32)
    ModelConfig(vocab_size=40, d_model=48, n_layers=2, n_heads=4, memory_layers=[1], memory_branch="hml",
                memory={"n_subspaces": 3, "pkm_query_dim": 32, "n_subkeys": 4, "topk": 4})
