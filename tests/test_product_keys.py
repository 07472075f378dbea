"""Shared product-key retrieval, weighted value lookup and slot-usage statistics."""

from __future__ import annotations

import math

import pytest
import torch

from midus.model.retrieval.ops import bag_weight_gradient, flat_weighted_row_sum
from midus.model.retrieval.product_keys import (
    ProductKeys,
    brute_force_retrieval,
    sorted_pair_candidates,
    subkey_scores,
    top_subkey_scores,
)
from midus.model.retrieval.slot_usage import SlotUsage
from midus.model.retrieval.value_lookup import weighted_row_sum


def in_slot_order(weights: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    slots, order = slots.sort(-1)
    return weights.gather(-1, order), slots


@pytest.mark.parametrize(
    ("heads", "query_dim", "n_subkeys", "topk", "query_norm"),
    [(1, 16, 16, 4, "none"), (4, 8, 32, 32, "none"), (3, 12, 20, 7, "layernorm"), (2, 6, 9, 1, "rmsnorm")],
)
def test_retrieval_matches_brute_force_over_all_slots(heads, query_dim, n_subkeys, topk, query_norm) -> None:
    torch.manual_seed(0)
    keys = ProductKeys(heads, query_dim, n_subkeys, topk, query_norm)
    if keys.query_norm is not None:  # non-trivial gains, so the norm's parameters matter
        torch.nn.init.uniform_(keys.query_norm.weight, 0.5, 1.5)
    queries = torch.randn(3, 50, heads, query_dim)
    weights, slots = in_slot_order(*keys(queries))
    expected_weights, expected_slots = in_slot_order(*brute_force_retrieval(keys, queries))
    assert slots.shape == (3, 50, heads, topk) and slots.max() < n_subkeys**2
    assert torch.equal(slots, expected_slots)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 50, heads))


def test_sorted_pair_shortlist_is_the_dominance_bound() -> None:
    rows, cols = sorted_pair_candidates(32)
    assert len(rows) == sum(32 // i for i in range(1, 33)) == 119  # instead of 32² = 1024
    assert bool(((rows + 1) * (cols + 1) <= 32).all())
    pairs = set(zip(rows.tolist(), cols.tolist()))
    assert (31, 0) in pairs and (0, 31) in pairs and (1, 15) in pairs and (1, 16) not in pairs


def test_gradients_reach_queries_and_subkeys_through_the_weights() -> None:
    torch.manual_seed(0)
    keys = ProductKeys(2, 8, 10, 4, "layernorm")
    queries = torch.randn(5, 2, 8, requires_grad=True)
    weights, slots = keys(queries)
    table = torch.randn(100, 3)
    (weighted_row_sum(table, slots, weights) ** 2).sum().backward()
    assert queries.grad.abs().sum() > 0 and keys.subkeys.grad.abs().sum() > 0
    assert keys.query_norm.weight.grad.abs().sum() > 0


def test_weighted_row_sum_gradients_match_autograd_of_a_gather() -> None:
    torch.manual_seed(0)
    table = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    slots = torch.randint(0, 40, (25, 5))
    slots[0] = 7  # one bag reading the same row five times
    weights = torch.rand(25, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w: flat_weighted_row_sum(t, slots, w), (table, weights))
    out = weighted_row_sum(table, slots.view(5, 5, 5), weights.view(5, 5, 5))
    reference = (table[slots] * weights[..., None]).sum(1).view(5, 5, 6)
    torch.testing.assert_close(out, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_handles_repeated_and_unsorted_slots(dtype: torch.dtype) -> None:
    table, slots = torch.randn(30, 8).to(dtype), torch.randint(0, 30, (9, 4))
    slots[0] = torch.tensor([5, 2, 5, 5])  # unsorted, one row read three times by one bag
    grad_out = torch.randn(9, 8).to(dtype)
    expected = torch.einsum("mkd,md->mk", table[slots].float(), grad_out.float())
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(bag_weight_gradient(table, slots, grad_out).float(), expected, **tolerance)


def test_slot_usage_statistics_on_known_reads() -> None:
    usage = SlotUsage(n_heads=2, n_slots=4, device=torch.device("cpu"))
    # Head 0 reads slots 0 and 1 equally with uniform weights; head 1 always slot 3 with one-hot weights.
    slots = torch.tensor([[[0, 1], [3, 3]], [[1, 0], [3, 3]]])  # (tokens=2, heads=2, k=2)
    weights = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [1.0, 0.0]]])
    usage.record(slots, weights)
    stats = usage.per_head()
    torch.testing.assert_close(stats["usage"], torch.tensor([0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(stats["kl_uniform"], torch.tensor([math.log(2), math.log(4)], dtype=torch.float64))
    torch.testing.assert_close(stats["entropy"], torch.tensor([math.log(2), 0.0], dtype=torch.float64))



def test_top_subkey_scores_backward_matches_dense_autograd() -> None:
    torch.manual_seed(0)
    halves = torch.randn(5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    subkeys = torch.randn(3, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, s: top_subkey_scores(h, s, 4)[0], (halves, subkeys))
    top, index = top_subkey_scores(halves, subkeys, 4)
    reference_top, reference_index = subkey_scores(halves, subkeys).topk(4, dim=-1)
    assert torch.equal(index, reference_index)
    torch.testing.assert_close(top, reference_top)


def test_score_scale_sharpens_the_weights_of_the_same_slots() -> None:
    # memory.score_scale: softmax(scale x score) over the same k slots; above 1 lowers the entropy.
    torch.manual_seed(0)
    queries = torch.randn(2, 30, 3, 12)
    keys = {scale: ProductKeys(3, 12, 20, 8, "none", score_scale=scale) for scale in (0.5, 1.0, 4.0)}
    for key in keys.values():
        key.load_state_dict(keys[1.0].state_dict())
    scores = subkey_scores(keys[1.0].query_halves(queries), keys[1.0].subkeys)  # (..., H, 2, n)
    full = (scores[..., 0, :, None] + scores[..., 1, None, :]).flatten(-2)  # every slot's raw score
    entropies = {}
    for scale, key in keys.items():
        weights, slots = in_slot_order(*key(queries))
        assert torch.equal(slots, in_slot_order(*keys[1.0](queries))[1])  # the same slots are read
        expected = torch.softmax(scale * full.gather(-1, slots), dim=-1)
        torch.testing.assert_close(weights, expected)
        entropies[scale] = float(-(weights * weights.log()).sum(-1).mean())
    assert entropies[4.0] < entropies[1.0] < entropies[0.5] <= math.log(8)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_a_non_positive_score_scale_is_refused_naming_the_field(scale) -> None:
    from midus.model.memory_config import MemoryConfig

    with pytest.raises(ValueError, match="memory.score_scale must be a positive number"):
        MemoryConfig(score_scale=scale).validate(d_model=32, n_heads=4)


@pytest.mark.parametrize("key_norm", ["layernorm", "rmsnorm"])
def test_key_norm_scores_against_normalised_sub_key_rows(key_norm) -> None:
    # memory.key_norm: each sub-key row normalised (no gain) before scoring; computed by hand here.
    torch.manual_seed(0)
    keys = ProductKeys(2, 12, 10, 4, "none", key_norm=key_norm)
    with torch.no_grad():
        keys.subkeys.mul_(torch.linspace(0.1, 5.0, 10)[:, None])  # rows of very different lengths
    queries = torch.randn(3, 20, 2, 12)
    rows = keys.subkeys.detach()
    if key_norm == "layernorm":
        rows = rows - rows.mean(-1, keepdim=True)
        rows = rows / (rows.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    else:
        rows = rows / (rows.pow(2).mean(-1, keepdim=True) + torch.finfo(rows.dtype).eps).sqrt()
    halves = queries.unflatten(-1, (2, -1))  # (..., H, 2, 6)
    scores = torch.einsum("...hpc,hpnc->...hpn", halves, rows)
    full = (scores[..., 0, :, None] + scores[..., 1, None, :]).flatten(-2)
    best, expected_slots = full.topk(4, dim=-1)
    weights, slots = in_slot_order(*keys(queries))
    expected_weights, expected_slots = in_slot_order(torch.softmax(best, -1), expected_slots)
    assert torch.equal(slots, expected_slots)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    plain = ProductKeys(2, 12, 10, 4, "none")
    plain.load_state_dict(keys.state_dict())
    assert not torch.equal(in_slot_order(*plain(queries))[1], slots)  # the long rows no longer win
    keys(queries)[0].pow(2).sum().backward()
    assert keys.subkeys.grad is not None and keys.subkeys.grad.abs().sum() > 0  # the keys still train
