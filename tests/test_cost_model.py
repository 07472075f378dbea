"""The cost model's FLOP formulas against FLOPs counted by `torch.utils.flop_counter.FlopCounterMode`.

The counter sees only matmul-like ops (mm, bmm, addmm, sdpa ...), so each test compares the
formula's matmul share (`Cost.matmul_flops`) with it, exactly. What it cannot see, and the
formulas still count: norms, rotary, residual adds, SiLU, the softmax inside attention, top-k
over sub-keys and candidates, value gathers (embedding_bag) and the sparse sub-key backward
(two embedding_bags). The CPU flash kernel of `scaled_dot_product_attention` is not counted at
all, so attention runs on the math backend here, which computes (and the counter counts) the
full T × (C + T) score matrix, masked or not: the formulas are asked for ``attention_pairs="full"``.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from midus.analysis.cost_model import (
    BLOCK_KINDS,
    BlockSizes,
    Cost,
    Device,
    Part,
    Workload,
    block_parts,
    candidate_tuples,
    pair_candidates,
    part_seconds,
    roofline_seconds,
    step_costs,
    total,
)
from midus.model import LayerSpec, ModelConfig
from midus.model.block import TransformerBlock
from midus.model.kv_cache import KVCache
from midus.model.memory_block import MemoryBlock
from midus.model.retrieval.product_keys import sorted_pair_candidates, sorted_tuple_candidates
from midus.model.rotary import RotaryEmbedding

BRANCHES = {
    "transformer": ("transformer", "ffn", "hive"),
    "hml-hive": ("memory", "hml", "hive"),
    "hml-per_head": ("memory", "hml", "per_head"),
    "hml-shared": ("memory", "hml", "shared"),
    "pkm": ("memory", "pkm", "hive"),
    "multihead_pkm": ("memory", "multihead_pkm", "hive"),
}


def tiny_block(kind: str, n_subspaces: int = 2) -> tuple[torch.nn.Module, ModelConfig]:
    block_kind, branch, values = BRANCHES[kind]
    # Odd-ish sizes on purpose: a formula that swaps two of them gives a different count. Three
    # sub-spaces: heads of 24 and PKM queries of 30 split in three.
    config = ModelConfig(
        vocab_size=8, d_model=64 if n_subspaces == 2 else 96, n_heads=4, n_kv_heads=2, ffn_hidden=96,
        layers=[LayerSpec(block_kind, branch)],
        memory={"n_subkeys": 12 if n_subspaces == 2 else 5, "topk": 5, "latent_dim": 6, "values": values,
                "zero_init_values": False, "pkm_heads": 3, "pkm_query_dim": 40 if n_subspaces == 2 else 30,
                "n_subspaces": n_subspaces},
    )
    torch.manual_seed(0)
    block = TransformerBlock(config, 0) if block_kind == "transformer" else MemoryBlock(config, 0)
    return block, config


def counted(run) -> tuple[int, object]:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = run()
    return counter.get_total_flops(), result


def formula_matmul_flops(kind: str, config: ModelConfig, work: Workload, backward: bool) -> float:
    parts = block_parts(kind, BlockSizes.from_config(config), work, attention_pairs="full")
    return sum(part.backward.matmul_flops if backward else part.forward.matmul_flops for part in parts)


def test_every_block_kind_is_covered() -> None:
    assert set(BRANCHES) == set(BLOCK_KINDS)


@pytest.mark.parametrize("n_subspaces", [2, 3])
@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_training_step_matmul_flops_equal_the_counted_ones(kind: str, n_subspaces: int) -> None:
    block, config = tiny_block(kind, n_subspaces)
    batch, tokens = 2, 7
    x = torch.randn(batch, tokens, config.d_model)
    rope = RotaryEmbedding(config.head_dim, config.rope_theta)(torch.arange(tokens), x.dtype)
    forward_flops, out = counted(lambda: block(x, rope))
    backward_flops, _ = counted(lambda: out.square().mean().backward())
    work = Workload(batch, tokens)
    assert forward_flops > 0 and backward_flops > 0
    assert formula_matmul_flops(kind, config, work, backward=False) == forward_flops
    assert formula_matmul_flops(kind, config, work, backward=True) == backward_flops


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_decode_step_matmul_flops_equal_the_counted_ones(kind: str) -> None:
    block, config = tiny_block(kind)
    batch, context = 3, 9
    rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
    cache = KVCache(1, batch, context + 1, config.kv_heads, config.head_dim, torch.device("cpu"), torch.float32)
    x = torch.randn(batch, context + 1, config.d_model)
    with torch.no_grad():
        block(x[:, :context], rotary(torch.arange(context), x.dtype), cache, 0)
        step_rope = rotary(torch.arange(context, context + 1), x.dtype)
        decode_flops, _ = counted(lambda: block(x[:, context:], step_rope, cache, context))
    work = Workload(batch, 1, context, cache=True)
    assert formula_matmul_flops(kind, config, work, backward=False) == decode_flops


def test_causal_pairs_are_about_half_the_full_square() -> None:
    sizes = BlockSizes(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96)
    work = Workload(1, 100)

    def scores(pairs: str) -> float:
        return next(p.forward.matmul_flops for p in block_parts("transformer", sizes, work, attention_pairs=pairs)
                    if p.name == "attention scores·values")

    assert scores("causal") == pytest.approx(scores("full") * 101 / 200)


def test_non_matmul_parts_are_counted_beside_the_matmuls() -> None:
    # The counter misses them; the formulas must not.
    sizes = BlockSizes(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=96, n_subkeys=12, topk=5)
    parts = {p.name: p for p in block_parts("hml-hive", sizes, Workload(2, 8))}
    for name in ("sub-key top-k", "candidate top-k, softmax", "value gather", "query norm"):
        assert parts[name].forward.flops > 0 and parts[name].forward.matmul_flops == 0
    # The sparse sub-key backward is not a matmul, and reads only k of n sub-keys per half.
    assert parts["sub-key scoring"].backward.matmul_flops == 0
    assert parts["sub-key scoring"].backward.flops == 4 * 2 * 8 * 4 * 5 * 16


@pytest.mark.parametrize("k", [1, 2, 5, 16, 32])
def test_pair_candidates_match_the_kits_shortlist_pairs(k: int) -> None:
    assert pair_candidates(k) == len(sorted_pair_candidates(k)[0])


@pytest.mark.parametrize(("k", "parts"), [(1, 2), (5, 2), (32, 2), (5, 3), (16, 3), (16, 4)])
def test_candidate_tuples_match_the_kits_shortlist_tuples(k: int, parts: int) -> None:
    assert candidate_tuples(k, parts) == sorted_tuple_candidates(k, parts).shape[1]


def test_three_sub_spaces_cost_the_same_scoring_on_more_slots() -> None:
    # Equal N = 4096 and query width: p = 3 scores 3 × 16 sub-keys of c/3 where p = 2 scores 2 × 64 of c/2.
    two, three = (BlockSizes(d_model=96, n_heads=4, n_kv_heads=2, head_dim=24, ffn_hidden=96, n_subkeys=n, topk=16,
                             n_subspaces=p) for n, p in ((64, 2), (16, 3)))
    parts = [{part.name: part for part in block_parts("hml-hive", sizes, Workload(2, 8))} for sizes in (two, three)]
    assert parts[1]["sub-key scoring"].forward.matmul_flops * 4 == parts[0]["sub-key scoring"].forward.matmul_flops
    assert parts[1]["value gather"].forward == parts[0]["value gather"].forward  # the same 4096-row bank


def test_roofline_takes_the_slower_of_compute_and_memory_per_part_and_sums_parts() -> None:
    device = Device("test", matmul_flops=100.0, other_flops=10.0, bandwidth=1.0)
    compute_bound = Part("a", Cost(flops=1000.0, matmul_flops=1000.0, bytes=2.0), Cost())  # 10 s vs 2 s
    memory_bound = Part("b", Cost(flops=10.0, matmul_flops=0.0, bytes=5.0), Cost(bytes=3.0))  # 1 s vs 5 s; bwd 3 s
    assert roofline_seconds([compute_bound, memory_bound], device, backward=False) == pytest.approx(15.0)
    assert roofline_seconds([compute_bound, memory_bound], device, backward=True) == pytest.approx(18.0)
    assert total(step_costs([compute_bound, memory_bound], backward=False)).intensity == pytest.approx(1010 / 7)


def test_a_cache_serves_gathers_only_from_tables_that_fit_in_it() -> None:
    # 100 bytes: 10 of indices and output, 90 gathered from a 30-byte table.
    gather = Cost(flops=1.0, bytes=100.0, gathered_bytes=90.0, table_bytes=30.0)
    no_cache = Device("dram only", 1e9, 1e9, bandwidth=1.0)
    small_cache = Device("20-byte cache", 1e9, 1e9, bandwidth=1.0, cache_bytes=20.0, cache_bandwidth=3.0)
    large_cache = Device("30-byte cache", 1e9, 1e9, bandwidth=1.0, cache_bytes=30.0, cache_bandwidth=3.0)
    assert part_seconds(gather, no_cache) == pytest.approx(100.0)
    assert part_seconds(gather, small_cache) == pytest.approx(100.0)
    # DRAM: 10 + the table once (30) = 40 s; cache: 90 / 3 = 30 s.
    assert part_seconds(gather, large_cache) == pytest.approx(40.0)
