"""The wide cell of the regime map (experiments/pretrain_wide.yaml, regime_x100_d384.yaml): every
arm builds the width, layout and parameter counts the headers quote, an identity at insertion, the
frozen arms train exactly what they add, and each new fact is seen 100 times.

The counts are computed from the architecture's formulas (d 384, 6 heads of 64, 2 KV heads, the
FFN rule's 1,024 hidden units, tied 1,024-token embeddings), never read back from the model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_experiment_arms import EXPERIMENTS, build, parse_arm

from midus.ablation.config import load_ablation
from midus.checkpoint.kit import MODEL_CONFIG_KEY
from midus.data.corpus import ATTRIBUTES, value_choices
from midus.model.block import TransformerBlock
from midus.model.branches.hml import HeadwiseMemory
from midus.model.memory_block import MemoryBlock

V, D, H, KV, DH, FFN = 1024, 384, 6, 2, 64, 1024
SLOTS, LATENT = 32**2, 64
ATTENTION = 2 * D * D + 2 * D * KV * DH
TRANSFORMER = 2 * D + ATTENTION + 3 * D * FFN
# One RMSNorm, attention without W_O, per head two sub-key tables of 32 x 32 and an rmsnorm gain per
# half, the latent bank and a latent x d_h projection per head (method notes, section 4).
MEMORY = D + (D * D + 2 * D * KV * DH) + (H * 2 * 32 * (DH // 2) + H * DH) + SLOTS * LATENT + H * LATENT * DH
BASE = V * D + 4 * TRANSFORMER + D
ADDED = {"base": 0, "base_continued": 0, "dus_interleave_frozen": 2 * TRANSFORMER,
         "dus_one_copy_frozen": TRANSFORMER, "midus_hml_hive_frozen": 2 * MEMORY}
STACKS = {"base": "TTTT", "base_continued": "TTTT", "dus_interleave_frozen": "TTTTTT",
          "dus_one_copy_frozen": "TTTTT", "midus_hml_hive_frozen": "TTMTTM"}


def test_the_quoted_counts_are_the_formulas() -> None:
    assert BASE == 6_688_128  # pretrain_wide.yaml
    headers = (EXPERIMENTS / "pretrain_wide.yaml").read_text() + (EXPERIMENTS / "regime_x100_d384.yaml").read_text()
    for count in (BASE, 2 * TRANSFORMER, TRANSFORMER, 2 * MEMORY):
        assert f"{count:,}" in headers, count
    assert f"{MEMORY / TRANSFORMER:.2f}x a copied block" in headers  # 0.22x


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory: pytest.TempPathFactory):
    module = build(parse_arm("pretrain_wide", "wide"))
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    path = tmp_path_factory.mktemp("pretrain_wide") / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), MODEL_CONFIG_KEY: dataclasses.asdict(module.model.config)}, path)
    return path, module


@pytest.mark.parametrize("arm", list(ADDED))
def test_each_arm_builds_what_the_header_says(arm: str, wide_base) -> None:
    path, base = wide_base
    module = build(parse_arm("regime_x100_d384", arm, "--model.upscale.base_checkpoint", str(path)))
    model = module.model
    assert (model.config.d_model, model.config.n_heads, model.config.kv_heads, model.config.head_dim) == (D, H, KV, DH)
    kinds = "".join("M" if isinstance(b, MemoryBlock) else "T" for b in model.blocks)
    assert kinds == STACKS[arm]
    assert all(isinstance(b, TransformerBlock) for b in model.blocks if not isinstance(b, MemoryBlock))
    for block in model.blocks:
        if isinstance(block, MemoryBlock):
            assert isinstance(block.branch, HeadwiseMemory) and block.branch.values.weight.shape == (SLOTS, LATENT)
    assert model.num_parameters() == BASE + ADDED[arm]
    assert module.added_parameters == ADDED[arm]
    frozen = arm.endswith("_frozen")
    assert model.num_parameters(trainable_only=True) == (ADDED[arm] if frozen else BASE)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # every arm starts as the base's function
        assert torch.equal(model.eval()(ids), base.model.eval()(ids))


def test_every_new_fact_is_seen_100_times_and_each_arm_has_its_control() -> None:
    ablation = load_ablation(EXPERIMENTS / "regime_x100_d384.yaml")
    assert set(ablation.arms) == set(ADDED)
    for arm in ablation.arms:
        parsed = parse_arm("regime_x100_d384", arm)
        embedded = parsed.data.embedded
        assert embedded.docs_per_person * parsed.trainer.max_epochs == 100
        assert (embedded.seed, embedded.num_people) == (3, 60)
        assert parsed.model.upscale.base_checkpoint == "runs/pretrain_wide/wide/checkpoints/last.ckpt"
    assert {arm: ablation.control[arm] for arm in ablation.arms if arm.endswith("_frozen")} == dict.fromkeys(
        ["dus_interleave_frozen", "dus_one_copy_frozen", "midus_hml_hive_frozen"], "base")
    bits = 60 * sum(math.log2(len(value_choices(attribute))) for attribute in ATTRIBUTES)
    assert f"{round(bits):,} bits" in (EXPERIMENTS / "regime_x100_d384.yaml").read_text()
    # The wide base reads the d-128 base's text and tokenizer.
    wide, narrow = parse_arm("pretrain_wide", "wide").data, parse_arm("pretrain_base", "base").data
    assert wide == narrow
