"""Memory-branch outputs against direct, loop-based references of the method's formulas.

Every reference here gathers value rows one (token, head, retrieved slot) at a time with
plain Python loops and never calls the kit's value lookup (`weighted_row_sum`,
`MemoryValues.forward`), so a wrong table offset, a swapped value layout, a confused
combine mode or a projection applied to the wrong head shows up as a numeric mismatch.
Sizes are tiny but not degenerate: several heads, n = 6 sub-keys (36 slots per head),
k = 3, batch 2 and time 3, random nonzero values (``zero_init_values: false``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from midus.model import MidusLM, ModelConfig
from midus.model.branches.registry import build_branch
from midus.model.memory_block import MemoryBlock
from midus.model.retrieval.product_keys import ProductKeys

D_MODEL, HEADS, HEAD_DIM = 32, 4, 8
N_SUBKEYS, TOPK, LATENT = 6, 3, 4
N_SLOTS = N_SUBKEYS**2
BATCH, TIME = 2, 3


def memory_settings(**overrides) -> dict:
    """Tiny product-key memory with random (nonzero) values."""
    return {"n_subkeys": N_SUBKEYS, "topk": TOPK, "latent_dim": LATENT, "zero_init_values": False, **overrides}


def hml_block(values: str, combine: str, seed: int = 0) -> MemoryBlock:
    """A memory block (layer 0 of a one-layer stack) whose branch is HML with the given layout."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=16, d_model=D_MODEL, n_layers=1, n_heads=HEADS, memory_layers=[0], memory_branch="hml",
        memory=memory_settings(values=values, combine=combine),
    )
    return MemoryBlock(config, 0).eval()


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, time, heads·c) → (batch, time, heads, c) by explicit slicing: head h is columns h·c..(h+1)·c-1."""
    width = x.shape[-1] // heads
    return torch.stack([x[..., h * width : (h + 1) * width] for h in range(heads)], dim=-2)


def capture_retrieval(keys: nn.Module) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Record every (weights, slots) that `keys` returns while the handle is live."""
    seen: list = []
    handle = keys.register_forward_hook(lambda _module, _args, out: seen.append(out))
    return seen, handle


def reference_hml(
    values: str, combine: str, table: torch.Tensor, head_proj: torch.Tensor | None,
    weights: torch.Tensor, slots: torch.Tensor,
) -> torch.Tensor:
    """HML output by loops: per_head o_h = Σ_i w_i V_h[slot_i] (V_h = rows h·n²..), shared
    o_h = Σ_i w_i V[slot_i], hive o_h = (Σ_i w_i U[slot_i]) · P_h; concat or sum over heads."""
    batch, time, heads, k = slots.shape
    rows = []
    for b in range(batch):
        for t in range(time):
            outputs = []
            for h in range(heads):
                pooled = torch.zeros(table.shape[1], dtype=table.dtype)
                for i in range(k):
                    slot = int(slots[b, t, h, i])
                    row = h * N_SLOTS + slot if values == "per_head" else slot
                    pooled = pooled + weights[b, t, h, i].to(table.dtype) * table[row]
                outputs.append(pooled @ head_proj[h] if values == "hive" else pooled)
            rows.append(torch.cat(outputs) if combine == "concat" else torch.stack(outputs).sum(0))
    return torch.stack(rows).view(batch, time, -1)


HML_LAYOUTS = [(values, combine) for values in ("per_head", "shared", "hive") for combine in ("concat", "sum")]


@pytest.mark.parametrize(("values", "combine"), HML_LAYOUTS)
@torch.no_grad()
def test_hml_output_matches_loop_reference(values: str, combine: str) -> None:
    """Protects HML's value read: per-head table offsets, shared table, HIVE pool-then-project
    with each head's own P_h, and concat vs sum, against the documented formulas."""
    branch = hml_block(values, combine).branch
    heads = torch.randn(BATCH, TIME, D_MODEL, generator=torch.Generator().manual_seed(1))
    seen, handle = capture_retrieval(branch.keys)
    try:
        out = branch(heads)
    finally:
        handle.remove()
    # The head's own attention output is its query: q_h = columns h·d_h..(h+1)·d_h-1, no projection.
    weights, slots = branch.keys(split_heads(heads, HEADS))
    (seen_weights, seen_slots), = seen
    assert torch.equal(seen_slots, slots)
    torch.testing.assert_close(seen_weights, weights)
    # Retrieval spreads over the table: the reads would differ if a layout were swapped.
    assert len(set(slots.flatten().tolist())) > TOPK

    table = branch.values.weight
    head_proj = branch.head_proj if values == "hive" else None
    rows = {"per_head": HEADS * N_SLOTS, "shared": N_SLOTS, "hive": N_SLOTS}[values]
    width = {"hive": LATENT, "per_head": HEAD_DIM, "shared": HEAD_DIM}[values]
    if combine == "sum" and values != "hive":
        width = D_MODEL
    assert table.shape == (rows, width)
    expected = reference_hml(values, combine, table, head_proj, weights, slots)
    out_width = HEADS * HEAD_DIM if combine == "concat" else D_MODEL
    assert expected.shape == (BATCH, TIME, out_width)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(("values", "combine"), HML_LAYOUTS)
@torch.no_grad()
def test_hml_read_of_a_fixed_retrieval_matches_loop_reference(values: str, combine: str) -> None:
    """Protects `HeadwiseMemory.read` (used by the fixed-retrieval analysis) on a hand-made
    retrieval where every head reads the same slots: only the per-head offset and the
    per-head projection can then tell the heads apart."""
    branch = hml_block(values, combine, seed=2).branch
    generator = torch.Generator().manual_seed(3)
    same_slots = torch.randint(0, N_SLOTS, (BATCH, TIME, 1, TOPK), generator=generator).expand(-1, -1, HEADS, -1)
    weights = torch.softmax(torch.randn(BATCH, TIME, HEADS, TOPK, generator=generator), dim=-1)
    head_proj = branch.head_proj if values == "hive" else None
    expected = reference_hml(values, combine, branch.values.weight, head_proj, weights, same_slots)
    torch.testing.assert_close(branch.read(weights, same_slots.contiguous()), expected)


def pkm_branch(name: str, memory: dict, seed: int = 0) -> nn.Module:
    """A PKM-family branch built from a one-layer config, its query norm given nontrivial gains."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=16, d_model=D_MODEL, n_layers=1, n_heads=HEADS, branch=name, memory=memory)
    branch = build_branch(name, config, 0).eval()
    norm = branch.keys.query_norm
    if norm is not None:
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        if norm.bias is not None:
            nn.init.uniform_(norm.bias, -0.3, 0.3)
    return branch


PKM_CASES = {
    "pkm": ("pkm", memory_settings(), 1, D_MODEL),
    "pkm-layernorm": ("pkm", memory_settings(query_norm="layernorm", pkm_query_dim=12), 1, 12),
    "multihead_pkm": ("multihead_pkm", memory_settings(pkm_heads=3, pkm_query_dim=8), 3, 8),
    "multihead_pkm-rmsnorm": ("multihead_pkm", memory_settings(query_norm="rmsnorm"), HEADS, D_MODEL),
}


@pytest.mark.parametrize("case", PKM_CASES)
@torch.no_grad()
def test_pkm_output_matches_loop_reference(case: str) -> None:
    """Protects PKM and multi-head PKM: query projection split per head, one retrieval per
    head from that head's keys, and Σ_h Σ_i w_{h,i} · V[slot_{h,i}] from one d-wide table."""
    name, memory, heads, query_dim = PKM_CASES[case]
    branch = pkm_branch(name, memory)
    x = torch.randn(BATCH, TIME, D_MODEL, generator=torch.Generator().manual_seed(1))
    seen, handle = capture_retrieval(branch.keys)
    try:
        out = branch(x)
    finally:
        handle.remove()
    projection = branch.query_proj.weight
    assert projection.shape == (heads * query_dim, D_MODEL)
    queries = split_heads(x @ projection.T, heads)  # (batch, time, heads, query_dim)
    weights, slots = branch.keys(queries)
    (seen_weights, seen_slots), = seen
    assert torch.equal(seen_slots, slots)
    torch.testing.assert_close(seen_weights, weights)

    table = branch.values.weight
    assert table.shape == (N_SLOTS, D_MODEL)
    expected = torch.zeros(BATCH, TIME, D_MODEL)
    for b in range(BATCH):
        for t in range(TIME):
            for h in range(heads):
                for i in range(TOPK):
                    expected[b, t] += weights[b, t, h, i] * table[int(slots[b, t, h, i])]
    torch.testing.assert_close(out, expected)


def reference_norm(half: torch.Tensor, kind: str, gain: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One query half normalised as documented: layer norm (mean/variance, gain, bias) or RMS norm (gain)."""
    if kind == "none":
        return half
    if kind == "layernorm":
        mean = half.mean()
        variance = ((half - mean) ** 2).mean()
        return (half - mean) / torch.sqrt(variance + 1e-5) * gain + bias
    return half / torch.sqrt((half**2).mean() + torch.finfo(half.dtype).eps) * gain


@pytest.mark.parametrize("query_norm", ["none", "layernorm", "rmsnorm"])
@torch.no_grad()
def test_product_key_retrieval_matches_brute_force_loop_over_all_slots(query_norm: str) -> None:
    """Protects retrieval: for every head, score(a, b) = q1·K1_h[a] + q2·K2_h[b] over all n²
    slots (slot a·n + b), with each query half normalised by that head's own gain and bias,
    top-k, softmax over the k. Catches swapped halves, slot a/b order, heads sharing keys."""
    torch.manual_seed(0)
    heads, query_dim = 3, 8
    half = query_dim // 2
    keys = ProductKeys(heads, query_dim, N_SUBKEYS, TOPK, query_norm)
    norm = keys.query_norm
    if norm is not None:  # distinct gains and biases per head and half, so using the wrong one shows
        nn.init.uniform_(norm.weight, 0.3, 2.0)
        if norm.bias is not None:
            nn.init.uniform_(norm.bias, -0.5, 0.5)
    queries = torch.randn(4, heads, query_dim, generator=torch.Generator().manual_seed(5)) * 2 + 0.5
    weights, slots = keys(queries)
    for token in range(queries.shape[0]):
        for h in range(heads):
            halves = []
            for p in range(2):
                gain = norm.weight[h, p] if norm is not None else None
                bias = norm.bias[h, p] if norm is not None and norm.bias is not None else None
                halves.append(reference_norm(queries[token, h, p * half : (p + 1) * half], query_norm, gain, bias))
            scored = []
            for a in range(N_SUBKEYS):
                for b in range(N_SUBKEYS):
                    score = float(halves[0] @ keys.subkeys[h, 0, a]) + float(halves[1] @ keys.subkeys[h, 1, b])
                    scored.append((score, a * N_SUBKEYS + b))
            best = sorted(scored, reverse=True)[:TOPK]
            assert best[TOPK - 1][0] - sorted(scored, reverse=True)[TOPK][0] > 1e-4  # no near-tie at the cut
            total = sum(math.exp(score) for score, _ in best)
            expected = {slot: math.exp(score) / total for score, slot in best}
            got = {int(s): float(w) for s, w in zip(slots[token, h], weights[token, h])}
            assert set(got) == set(expected), (token, h)
            for slot, weight in expected.items():
                assert got[slot] == pytest.approx(weight, rel=1e-4, abs=1e-6), (token, h, slot)


def memory_block_model(branch: str, internal_residual: bool) -> MidusLM:
    """T M: a Transformer block, then a memory block with random memory values."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=16, d_model=D_MODEL, n_layers=2, n_heads=HEADS, n_kv_heads=2, init_std=0.2,
        memory_layers=[1], memory_branch=branch,
        memory=memory_settings(internal_residual=internal_residual, pkm_heads=2, pkm_query_dim=8),
    )
    return MidusLM(config).eval()


def forward_capturing(model: MidusLM, block: MemoryBlock) -> dict[str, torch.Tensor]:
    """One forward of `model` on fixed ids; returns the memory block's input ``x``, its output
    ``out`` and its branch's input ``query``."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0])),
        block.register_forward_hook(lambda _m, _args, out: captured.__setitem__("out", out)),
        block.branch.register_forward_pre_hook(lambda _m, args: captured.__setitem__("query", args[0])),
    ]
    try:
        model(torch.randint(0, 16, (BATCH, 5), generator=torch.Generator().manual_seed(1)))
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.mark.parametrize("branch", ["hml", "multihead_pkm"])
@pytest.mark.parametrize("internal_residual", [False, True])
@torch.no_grad()
def test_memory_block_queries_its_branch_as_documented(branch: str, internal_residual: bool) -> None:
    """Protects M(x) = x + branch(Attn'(norm x)) (or x + branch(x + Attn'(norm x)) with
    internal_residual): the branch's input, inside a full forward at positions 0..T-1, and
    that only the branch output is added to the residual stream."""
    model = memory_block_model(branch, internal_residual)
    block = model.blocks[1]
    assert isinstance(block, MemoryBlock) and block.attn.o_proj is None
    captured = forward_capturing(model, block)
    x = captured["x"]
    time = x.shape[1]
    rope = model.rotary(torch.arange(time), x.dtype)
    heads = block.attn(block.attn_norm(x), rope, None, 0)  # Attn': concatenated, unprojected heads
    expected_query = x + heads if internal_residual else heads
    other_query = heads if internal_residual else x + heads
    torch.testing.assert_close(captured["query"], expected_query)
    expected_out = x + block.branch(expected_query)
    torch.testing.assert_close(captured["out"], expected_out)
    # The two wirings give different outputs here, so the check above tells them apart.
    assert (x + block.branch(other_query) - expected_out).abs().max() > 1e-3


@torch.no_grad()
def test_memory_block_with_output_projection_queries_its_branch_with_projected_heads() -> None:
    """memory.attn_output_projection: the branch reads W_O(Attn'(norm x)) (full attention)."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=16, d_model=D_MODEL, n_layers=2, n_heads=HEADS, n_kv_heads=2, init_std=0.2,
        memory_layers=[1], memory_branch="hml", memory=memory_settings(attn_output_projection=True),
    )
    model = MidusLM(config).eval()
    block = model.blocks[1]
    assert isinstance(block.attn.o_proj, torch.nn.Linear)
    captured = forward_capturing(model, block)
    x = captured["x"]
    rope = model.rotary(torch.arange(x.shape[1]), x.dtype)
    projection, block.attn.o_proj = block.attn.o_proj, None  # the unprojected heads, then W_O by hand
    heads = block.attn(block.attn_norm(x), rope, None, 0)
    block.attn.o_proj = projection
    expected = x + block.branch(heads @ projection.weight.T + (0 if projection.bias is None else projection.bias))
    torch.testing.assert_close(captured["out"], expected)
    assert (x + block.branch(heads) - expected).abs().max() > 1e-3  # W_O makes a difference here
