"""The sub-key backward without a host sync: same gradients as before, no data-dependent shape.

The sparse backward of the top-k sub-key scores (and the CPU value lookup) groups reads by table
row in `table_gradient_by_row`. It grouped them with `unique_consecutive`, whose output length is
the number of touched rows: on CUDA a device-to-host copy, so a host sync per memory block per
backward. Now every table row gets a bag (empty when unread). These tests check, on CPU (the same
code runs on every device), that the gradients are the former ones bit for bit and autograd's
through dense scores to rounding, that nothing in the backward has a data-dependent shape or
reads a value back to the host (FakeTensorMode refuses both), and, where a GPU exists, that
CUDA's sync debug mode sees no sync.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)

from midus.model import MidusLM, ModelConfig
from midus.model.retrieval import ops
from midus.model.retrieval.ops import bag_table_gradient, table_gradient_by_row
from midus.model.retrieval.product_keys import subkey_scores, top_subkey_scores

BIT_FOR_BIT = dict(rtol=0, atol=0)


def former_table_gradient(table, slots, weights, grad_out) -> torch.Tensor:
    """The grouping before this change, verbatim: only touched rows, found by unique_consecutive."""
    k = slots.shape[1]
    sorted_slots, order = torch.sort(slots.flatten())
    rows, reads = torch.unique_consecutive(sorted_slots, return_counts=True)
    offsets = torch.cumsum(reads, 0) - reads
    per_row = F.embedding_bag(
        order // k, grad_out.to(table.dtype), offsets, mode="sum",
        per_sample_weights=weights.flatten()[order].to(table.dtype),
    )
    grad_table = torch.zeros_like(table)
    grad_table[rows] = per_row
    return grad_table


def reads(rows: int, bags: int, k: int, width: int, dtype: torch.dtype, seed: int):
    """A table, slots that repeat rows within and across bags and leave rows 0 and rows-1 unread
    (the first and the last bag then are empty), per-read weights and output gradients."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, width, generator=generator).to(dtype)
    slots = torch.randint(1, rows - 1, (bags, k), generator=generator)
    if bags > 1:
        slots[0] = slots[0, 0]  # one bag reads a single row k times
    weights = torch.randn(bags, k, generator=generator).to(dtype)
    grad_out = torch.randn(bags, width, generator=generator).to(dtype)
    return table, slots, weights, grad_out


SHAPES = {"few-rows-many-reads": (6, 40, 4, 3), "many-rows-few-reads": (500, 7, 5, 8), "no-reads": (9, 0, 4, 2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_table_gradient_is_the_former_one_bit_for_bit(shape: tuple, dtype: torch.dtype) -> None:
    table, slots, weights, grad_out = reads(*shape, dtype=dtype, seed=0)
    expected = former_table_gradient(table, slots, weights, grad_out)
    if slots.numel():
        assert not torch.equal(expected, torch.zeros_like(expected))
    assert expected[0].abs().sum() == 0 and expected[-1].abs().sum() == 0  # unread rows exist
    inputs = (table, slots, weights, grad_out)
    for got in (table_gradient_by_row(*inputs), bag_table_gradient(*inputs)):
        assert got.dtype == table.dtype and got.shape == table.shape
        torch.testing.assert_close(got, expected, **BIT_FOR_BIT)


def test_table_gradient_equals_a_dense_scatter_reference() -> None:
    # Independent of any grouping: d table[r] = Σ_{(m, j): slots[m, j] = r} w[m, j] · d out[m].
    table, slots, weights, grad_out = reads(50, 30, 6, 4, torch.float64, seed=3)
    reference = torch.zeros_like(table).index_add_(
        0, slots.flatten(), weights.flatten()[:, None] * grad_out.repeat_interleave(slots.shape[1], 0)
    )
    torch.testing.assert_close(table_gradient_by_row(table, slots, weights, grad_out), reference, rtol=0, atol=1e-12)


def scoring(dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Query halves (tokens, H=3, 2, c=4) and sub-keys (H, 2, n=9, c), both needing grad."""
    generator = torch.Generator().manual_seed(seed)
    halves = torch.randn(7, 3, 2, 4, generator=generator).to(dtype).requires_grad_()
    subkeys = torch.randn(3, 2, 9, 4, generator=generator).to(dtype).requires_grad_()
    return halves, subkeys


def score_gradients(top: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    probe = torch.randn(top.shape, generator=torch.Generator().manual_seed(2)).to(top.dtype)
    return torch.autograd.grad(top, inputs, probe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_subkey_backward_is_the_former_one_bit_for_bit(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    halves, subkeys = scoring(dtype)
    new = score_gradients(top_subkey_scores(halves, subkeys, 4)[0], (halves, subkeys))
    # The same backward with the former grouping swapped in: the custom op looks it up by name.
    monkeypatch.setattr(ops, "table_gradient_by_row", former_table_gradient)
    former = score_gradients(top_subkey_scores(halves, subkeys, 4)[0], (halves, subkeys))
    for got, expected in zip(new, former):
        torch.testing.assert_close(got, expected, **BIT_FOR_BIT)


def test_subkey_backward_equals_autograd_through_dense_scores() -> None:
    halves, subkeys = scoring(torch.float64)
    sparse = score_gradients(top_subkey_scores(halves, subkeys, 4)[0], (halves, subkeys))
    dense = score_gradients(subkey_scores(halves, subkeys).topk(4, dim=-1)[0], (halves, subkeys))
    assert sparse[1].abs().sum() > 0
    for got, expected in zip(sparse, dense):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def refuse(*args, **kwargs):
    raise AssertionError("a data-dependent op ran in the memory backward")


def test_a_memory_model_trains_without_unique_consecutive(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CPU path is the path of every device (no branch on the device type), so refusing the op
    # here shows that a CUDA backward never calls it either. PKM and HML on CPU also route their
    # value-table gradient through the same grouping.
    monkeypatch.setattr(torch, "unique_consecutive", refuse)
    monkeypatch.setattr(torch.Tensor, "unique_consecutive", refuse)
    for branch in ("hml", "pkm"):
        torch.manual_seed(0)
        model = MidusLM(ModelConfig(
            vocab_size=30, d_model=32, n_layers=2, n_heads=4, memory_layers=[1], memory_branch=branch,
            memory={"n_subkeys": 8, "topk": 4, "latent_dim": 8, "zero_init_values": False},
        ))
        ids = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(1))
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        assert model.blocks[1].branch.keys.subkeys.grad.abs().sum() > 0


def test_table_gradient_has_no_data_dependent_shape_and_no_host_read() -> None:
    # FakeTensorMode (no shape environment) raises on an op whose output shape depends on the data
    # (unique_consecutive, nonzero, boolean masks) and on reading a value back (.item(), int()):
    # exactly the ops that make CUDA wait for the device.
    table, slots, weights, grad_out = reads(20, 12, 4, 3, torch.float32, seed=5)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(tensor) for tensor in (table, slots, weights, grad_out)]
        assert table_gradient_by_row(*fake).shape == table.shape
        with pytest.raises(DynamicOutputShapeException):  # the check is not vacuous: the former grouping fails it
            former_table_gradient(*fake)
        with pytest.raises(DataDependentOutputException):
            int(fake[1][0, 0])


def test_the_whole_subkey_backward_has_no_data_dependent_shape() -> None:
    # The registered backward itself (index arithmetic, the query-gradient bag sum, and the table
    # gradient, whose op runs its fake kernel here and its body in the test above).
    halves, subkeys = (tensor.detach() for tensor in scoring())
    top, index = subkey_scores(halves, subkeys).topk(4, dim=-1)
    grad_top = torch.ones_like(top)
    with FakeTensorMode() as mode:
        saved = tuple(mode.from_tensor(tensor) for tensor in (halves, subkeys, index))
        ctx = SimpleNamespace(saved_tensors=saved, needs_input_grad=(False, True, True, False))
        _, grad_halves, grad_subkeys, _ = ops._kept_subkey_scores_backward(
            ctx, mode.from_tensor(grad_top), None
        )
    assert grad_halves.shape == halves.shape and grad_subkeys.shape == subkeys.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_subkey_backward_issues_no_host_sync() -> None:
    halves, subkeys = (tensor.detach().cuda().requires_grad_() for tensor in scoring())
    top, _ = top_subkey_scores(halves, subkeys, 4)
    probe = torch.randn_like(top)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.autograd.grad(top, (halves, subkeys), probe)
    finally:
        torch.cuda.set_sync_debug_mode("default")
