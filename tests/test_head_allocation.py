"""Per-head memory reads (``memory.head_topk``) and their allocation from the base's head importance
(``model.upscale.memory_allocation: head_importance``): exact per-head retrieval against brute force,
the default unchanged bit for bit, the allocation rule, identity at insertion and equal parameters."""

from __future__ import annotations

import dataclasses
import logging

import lightning.pytorch as pl
import pytest
import torch

from midus.checkpoint import load_kit_checkpoint
from midus.model import MidusLM, ModelConfig
from midus.model.memory_config import MemoryConfig
from midus.model.retrieval.product_keys import ProductKeys, subkey_scores, top_subkey_scores
from midus.model.retrieval.slot_usage import SlotUsageTracker
from midus.model.transformer import next_token_loss
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.upscale import UpscaleConfig, upscale
from midus.upscale.head_allocation import allocate_topk, attention_head_importance, importance_allocation

VOCAB = 40
MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8}


def base_model(seed: int = 0) -> MidusLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, init_std=0.2)
    return MidusLM(config).eval()


def batches(count: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (count, 2, 13), generator=torch.Generator().manual_seed(seed))
    return [(row[:, :-1], row[:, 1:]) for row in ids]


def test_default_retrieval_is_todays_unsorted_top_k_bit_for_bit() -> None:
    # The default (no head_topk) must compute exactly what the retrieval computed before per-head k
    # existed: the unsorted top k of the candidate pairs and a softmax over all k.
    torch.manual_seed(0)
    keys = ProductKeys(4, 16, 8, 5, "rmsnorm", score_scale=1.5)
    queries = torch.randn(3, 7, 4, 16)
    assert keys.head_keep is None
    halves = keys.query_halves(queries)
    top, sub_index = top_subkey_scores(halves, keys.scored_subkeys(), 5)
    s1, s2 = top.unbind(-2)
    first, second = keys.candidates
    pair_scores = s1.index_select(-1, first) + s2.index_select(-1, second)
    best, pair = pair_scores.topk(5, dim=-1, sorted=False)
    slots = sub_index[..., 0, :].gather(-1, first[pair]) * 8 + sub_index[..., 1, :].gather(-1, second[pair])
    weights, got_slots = keys(queries)
    assert torch.equal(got_slots, slots)
    assert torch.equal(weights, torch.softmax(best.float() * 1.5, dim=-1))
    per_head = ProductKeys(4, 16, 8, 5, "rmsnorm", head_topk=[5] * 4)
    assert set(keys.state_dict()) == set(per_head.state_dict())  # head_keep is no weight: checkpoints unchanged


@pytest.mark.parametrize("subspaces", [2, 3])
@pytest.mark.parametrize("head_topk", [[1, 8, 3, 4], [6, 6, 2, 2], [2, 2, 2, 2]])
def test_per_head_retrieval_is_each_heads_brute_force_top_k_h(head_topk: list[int], subspaces: int) -> None:
    torch.manual_seed(1)
    keys = ProductKeys(4, 12, 8, 4, "rmsnorm", score_scale=2.0, n_subspaces=subspaces, head_topk=head_topk)
    queries = torch.randn(5, 3, 4, 12)
    weights, slots = keys(queries)
    assert weights.shape == slots.shape == (5, 3, 4, max(head_topk))
    scores = subkey_scores(keys.query_halves(queries), keys.scored_subkeys())  # (..., H, p, n)
    full = scores[..., 0, :]
    for part in range(1, subspaces):  # (..., H, nᵖ): every slot, mixed radix as the retrieval numbers them
        full = (full[..., :, None] + scores[..., part, None, :]).flatten(-2)
    for head, k in enumerate(head_topk):
        best, expected = full[..., head, :].topk(k, dim=-1)
        kept = weights[..., head, :] > 0
        assert bool((kept.sum(-1) == k).all()) and not kept[..., k:].any()  # kept reads first, the rest zero
        assert torch.equal(slots[..., head, :k].sort(-1).values, expected.sort(-1).values)
        order = slots[..., head, :k].argsort(-1)
        got = weights[..., head, :k].gather(-1, order)
        want = torch.softmax(best.float() * 2.0, -1).gather(-1, expected.argsort(-1))
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(weights[..., head, :].sum(-1), torch.ones(5, 3))


def test_reads_past_a_heads_k_get_no_gradient_and_do_not_count_as_reads() -> None:
    torch.manual_seed(2)
    keys = ProductKeys(2, 8, 8, 3, head_topk=[1, 5])
    queries = torch.randn(4, 2, 8, requires_grad=True)
    weights, slots = keys(queries)
    scores = torch.randn_like(weights)
    (weights * scores).sum().backward()
    assert queries.grad[:, 0].abs().sum() == 0  # head 0 reads one slot: weight 1 whatever its score
    assert queries.grad[:, 1].abs().sum() > 0
    model = torch.nn.Module()
    model.keys = keys
    with SlotUsageTracker(model) as tracker:
        keys(queries)
    counts = next(iter(tracker.usages.values())).counts.view(2, 64)
    assert counts.sum(-1).tolist() == [4 * 1, 4 * 5]


@pytest.mark.parametrize(
    ("importance", "expected"),
    [
        ([4.0, 3.0, 2.0, 1.0], [6, 5, 3, 2]),  # 16 · s / 10 = 6.4, 4.8, 3.2, 1.6; largest remainders get the rest
        ([3.0, 1.0, 0.0, 0.0], [8, 6, 1, 1]),  # head 0 capped at n_subkeys, zeros at the floor of 1
        ([1.0, 1.0, 1.0, 1.0], [4, 4, 4, 4]),
        ([0.0, 0.0, 0.0, 0.0], [4, 4, 4, 4]),
        ([-1.0, 2.0, 0.0, 2.0], [1, 7, 1, 7]),  # a negative loss increase counts as 0
    ],
)
def test_allocation_sums_to_h_k_within_bounds_and_follows_importance(importance, expected) -> None:
    assert allocate_topk(torch.tensor(importance), topk=4, n_subkeys=8) == expected


def test_allocation_never_orders_heads_against_their_importance() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        heads = int(torch.randint(1, 9, (), generator=generator))
        n = int(torch.randint(1, 17, (), generator=generator))
        topk = int(torch.randint(1, n + 1, (), generator=generator))
        scores = torch.rand(heads, generator=generator) ** 3
        ks = allocate_topk(scores, topk, n)
        assert sum(ks) == heads * topk and all(1 <= k <= n for k in ks)
        for a in range(heads):
            for b in range(heads):
                if scores[a] > scores[b]:
                    assert ks[a] >= ks[b]


def test_head_importance_gates_equal_removing_or_scaling_the_heads_output_columns() -> None:
    base = base_model()
    data = batches()
    loss_increase = attention_head_importance(base, [1, 3], data, "loss_increase")
    grad_x_act = attention_head_importance(base, [1, 3], data, "grad_x_act")
    tokens = sum(targets.numel() for _, targets in data)
    assert all(parameter.requires_grad and parameter.grad is None for parameter in base.parameters())

    def summed_loss(model: MidusLM) -> float:  # per batch in float32, summed in float64 as the measure does
        return sum(float(next_token_loss(model(inputs), targets, reduction="sum")) for inputs, targets in data)

    with torch.no_grad():
        baseline = summed_loss(base)
    for block in (1, 3):
        o_proj = base.blocks[block].attn.o_proj.weight
        for head in range(4):
            removed = base_model()
            with torch.no_grad():  # the reference: head h's input columns of W_O at zero
                removed.blocks[block].attn.o_proj.weight[:, head * 8 : (head + 1) * 8] = 0
                increase = (summed_loss(removed) - baseline) / tokens
            assert loss_increase[block][head].item() == pytest.approx(increase, abs=1e-6)
        # The reference gradient: a scale g on each head's columns of W_O, d loss / d g at g = 1.
        reference = torch.zeros(4, dtype=torch.float64)
        for inputs, targets in data:
            scale = torch.ones(4, requires_grad=True)
            weight = o_proj * scale.repeat_interleave(8)[None, :]
            logits = torch.func.functional_call(base, {f"blocks.{block}.attn.o_proj.weight": weight}, (inputs,))
            (gradient,) = torch.autograd.grad(next_token_loss(logits, targets, reduction="sum"), scale)
            reference += gradient.abs().double()
        torch.testing.assert_close(grad_x_act[block], reference / tokens)


def test_importance_allocation_writes_each_blocks_row_from_the_block_it_follows() -> None:
    base = base_model()
    settings = UpscaleConfig(method="midus", positions=[3, 1], memory=MEMORY, memory_allocation="head_importance")
    allocated, importance = importance_allocation(base, settings, batches())
    assert sorted(importance) == [1, 3]
    # Rows in stack order: the memory block after base block 1 first.
    assert allocated.memory.head_topk == [allocate_topk(importance[index], 4, 8) for index in (1, 3)]
    assert allocated.memory.head_topk != [[4] * 4] * 2  # the random base's heads differ in importance
    assert dataclasses.replace(allocated.memory, head_topk=[]) == settings.memory

    uniform, _ = upscale(base, dataclasses.replace(settings, memory_allocation="uniform"))
    model, inserted = upscale(base, allocated)
    assert model.num_parameters() == uniform.num_parameters()
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in uniform.named_parameters()]
    inputs = batches()[0][0]
    with torch.no_grad():  # identity at insertion
        torch.testing.assert_close(model(inputs), base(inputs), rtol=0, atol=1e-6)
    for row, index in enumerate(inserted):
        keep = model.blocks[index].branch.keys.head_keep
        assert keep.sum(-1).tolist() == allocated.memory.head_topk[row]


def test_the_memory_estimate_counts_the_largest_per_head_k_every_head_retrieves() -> None:
    # Every head scores its largest k's candidates and keeps k_h of them: the saved activations grow
    # with the largest k, so the estimate must not read the uniform topk.
    from midus.training.memory_estimate import block_bytes_per_token

    uniform = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, memory_layers=[1],
                          memory=MemoryConfig(**MEMORY))
    skewed = dataclasses.replace(uniform, memory=MemoryConfig(**MEMORY, head_topk=[[1, 1, 6, 8]]))
    assert skewed.memory.retrieved_topk == 8 and uniform.memory.retrieved_topk == MEMORY["topk"] == 4
    index = 1
    grown = block_bytes_per_token(skewed, index, 4, 4) - block_bytes_per_token(uniform, index, 4, 4)
    assert grown == 4 * (8 * skewed.memory.n_subspaces + 20) * (8 - 4)  # per query head and retrieved slot


def test_random_values_with_per_head_k_train_away_from_uniform() -> None:
    # With values that read, per-head k changes the function (the zero-weight reads really are dropped).
    base = base_model()
    memory = {**MEMORY, "zero_init_values": False, "output_gate": False}
    torch.manual_seed(3)
    uniform, _ = upscale(base, UpscaleConfig(method="midus", every=2, memory=memory))
    torch.manual_seed(3)
    per_head, _ = upscale(base, UpscaleConfig(method="midus", every=2,
                                              memory={**memory, "head_topk": [[1, 7, 4, 4], [4, 4, 4, 4]]}))
    per_head.load_state_dict(uniform.state_dict())
    inputs = batches()[0][0]
    with torch.no_grad():
        assert (per_head(inputs) - uniform(inputs)).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ({"head_topk": [[4, 4, 4]]}, r"memory.head_topk\[0\]=\[4, 4, 4\] has 3 entries; expected one per head \(4\)"),
        ({"head_topk": [[0, 8, 4, 4]]}, r"memory.head_topk\[0\].*between 1 and memory.n_subkeys=8"),
        ({"head_topk": [[9, 1, 3, 3]]}, r"memory.head_topk\[0\].*between 1 and memory.n_subkeys=8"),
        ({"head_topk": [[5, 5, 4, 4]]}, r"memory.head_topk\[0\]=.* sums to 18; expected .* = 16"),
        ({"head_topk": [[4, 4, 4, 4]] * 3}, r"memory.head_topk has 3 rows; expected one per HML memory block \(2"),
    ],
)
def test_bad_head_topk_is_refused_naming_the_field(memory: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, memory_layers=[1, 3],
                    memory=MemoryConfig(**MEMORY, **memory))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"branch": "pkm"}, "needs model.upscale.method: midus and branch: hml"),
        ({"attn_init": "random"}, "needs model.upscale.attn_init: copy"),
        ({"importance_score": "entropy"}, "model.upscale.importance_score='entropy'"),
    ],
)
def test_importance_allocation_refuses_what_it_cannot_map(settings: dict, message: str) -> None:
    settings = UpscaleConfig(method="midus", every=2, memory=MEMORY, memory_allocation="head_importance", **settings)
    with pytest.raises(ValueError, match=message):
        importance_allocation(base_model(), settings, batches())


def test_importance_allocation_with_given_rows_or_no_batches_is_refused() -> None:
    given = UpscaleConfig(method="midus", every=2, memory={**MEMORY, "head_topk": [[4] * 4] * 2},
                          memory_allocation="head_importance")
    with pytest.raises(ValueError, match="model.upscale.memory_allocation=head_importance computes"):
        importance_allocation(base_model(), given, batches())
    with pytest.raises(ValueError, match="model.upscale.importance_batches must be positive"):
        UpscaleConfig(importance_batches=0)
    settings = UpscaleConfig(method="midus", every=2, memory=MEMORY, memory_allocation="head_importance")
    with pytest.raises(ValueError, match="the training split gave no batches"):
        importance_allocation(base_model(), settings, [])


def test_the_lightning_module_allocates_from_training_batches_and_the_checkpoint_keeps_it(
    tiny_data, tmp_path, caplog
) -> None:
    pl.seed_everything(0)
    config = ModelConfig(vocab_size=tiny_data.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    base_path = tmp_path / "base.ckpt"
    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(CausalLM(config, probes=ProbeConfig(recall_questions=0)), tiny_data)
    trainer.save_checkpoint(base_path)
    settings = UpscaleConfig(base_checkpoint=str(base_path), method="midus", every=1, memory=MEMORY,
                             memory_allocation="head_importance", importance_batches=2, trainable="new")
    with pytest.raises(ValueError, match="built without data"):
        CausalLM(config, upscale=settings)
    with caplog.at_level(logging.INFO, logger="midus.training.model_source"):
        module = CausalLM(config, upscale=settings, probes=ProbeConfig(recall_questions=0), allocation_data=tiny_data)
    assert "allocation_data" not in module.hparams
    rows = module.model.config.memory.head_topk
    assert f"memory.head_topk = {rows}" in caplog.text  # the allocation is logged
    base = load_kit_checkpoint(base_path).eval()
    loader = torch.utils.data.DataLoader(tiny_data.train_blocks, batch_size=tiny_data.settings["batch_size"])
    first = [batch["input_ids"] for _, batch in zip(range(2), loader)]
    importance = attention_head_importance(base, [0, 1], [(ids[:, :-1], ids[:, 1:]) for ids in first], "grad_x_act")
    assert rows == [allocate_topk(importance[index], 4, 8) for index in (0, 1)]
    uniform = CausalLM(config, upscale=dataclasses.replace(settings, memory_allocation="uniform"))
    assert module.model.num_parameters() == uniform.model.num_parameters()
    assert module.added_parameters == uniform.added_parameters
    saved = tmp_path / "upscaled.ckpt"
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, tiny_data)
    trainer.save_checkpoint(saved)
    base_path.unlink()
    assert load_kit_checkpoint(saved).config.memory.head_topk == rows
