"""Every arm of every experiments/*.yaml builds what its header comment says it builds.

test_cli.py checks that each YAML parses and instantiates on a tiny stand-in corpus; this
file resolves each arm exactly as the ablation runner does (`load_ablation` →
`Ablation.arm_config` → the kit's LightningCLI parser, no data preparation), builds its
`CausalLM` at full size (vocabulary linked by hand, as the CLI's ``data.vocab_size →
model.config.vocab_size`` link would) and checks, layer by layer, the block kinds, branches,
value layouts and parameter counts the YAML comments and experiments/README.md quote.

Expected counts are computed from the architecture's formulas below, never read back from
the model, and the numbers the documentation quotes must equal those formulas, so a wrong
layout or a stale comment fails. Up-scaling arms run on a random-weight base of
pretrain_base.yaml's architecture, saved as a kit checkpoint the way `CausalLM` saves one.

A new YAML or arm is discovered automatically; it fails until it has an entry in `EXPECTED`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import yaml

from midus.ablation.command_line import parse_command_line
from midus.ablation.config import load_ablation
from midus.ablation.runner import plan_arm
from midus.checkpoint import load_kit_checkpoint
from midus.checkpoint.kit import MODEL_CONFIG_KEY
from midus.data.embedded_splits import embedded_key
from midus.model import ModelConfig
from midus.model.block import TransformerBlock
from midus.model.branches.ffn import SwiGLUFeedForward
from midus.model.branches.hml import HeadwiseMemory
from midus.model.branches.multihead_pkm import MultiHeadProductKeyMemory
from midus.model.branches.pkm import ProductKeyMemory
from midus.model.memory_block import MemoryBlock
from midus.training import CausalLM
from midus.training.cli import parse_only
from midus.training.config import GROUPS
from midus.upscale import UpscaleConfig

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
BASE_YAML = EXPERIMENTS / "pretrain_base.yaml"

# ---------------------------------------------------------------------------------------------
# The architecture every YAML shares (the header comments: d 128, 4 heads of 32, 2 KV heads,
# a 1024-token BPE, tied embeddings), and the parameter formulas of each component.

V, D, H, KV = 1024, 128, 4, 2
DH = D // H  # 32
FFN_HIDDEN = 384  # Llama's rule: 8/3 · 128 = 341.3, rounded up to a multiple of 64


def attention(output_projection: bool = True) -> int:
    """q (d × d), k and v (d × kv·d_h each), o (d × d) unless a memory block drops it; no biases."""
    return D * D + 2 * D * KV * DH + (D * D if output_projection else 0)


def swiglu(hidden: int = FFN_HIDDEN) -> int:
    """gate and up (d → hidden), down (hidden → d)."""
    return 3 * D * hidden


QUERY_NORM_VECTORS = {"none": 0, "rmsnorm": 1, "layernorm": 2}  # gain; layernorm also a bias


def product_keys(spaces: int, query_width: int, n_subkeys: int, query_norm: str = "none", subspaces: int = 2) -> int:
    """Per space two half-key tables (`subspaces` tables in general) of n rows × query_width/2 (/p), and the
    query norm's gain (and bias) per space and half. `key_norm` (no gain) and `score_scale` (a constant) add
    nothing."""
    return (spaces * subspaces * n_subkeys * (query_width // subspaces)
            + QUERY_NORM_VECTORS[query_norm] * spaces * query_width)


def hml(values: str, n_subkeys: int, latent: int = 32, query_norm: str = "none") -> int:
    """HML over the H attention heads (queries of width d_h, no query projection)."""
    slots = n_subkeys**2
    table = {
        "hive": slots * latent + H * latent * DH,  # one latent bank + a latent × d_h projection per head
        "per_head": H * slots * DH,  # one n² × d_h table per head
        "shared": slots * DH,  # one n² × d_h table read by every head
    }[values]
    return table + product_keys(H, DH, n_subkeys, query_norm)


def pkm(n_subkeys: int, heads: int = 1, query_width: int = D, query_norm: str = "none", subspaces: int = 2) -> int:
    """(Multi-head) PKM: query projection d → heads·c, a key space per head, one n² (nᵖ) × d table."""
    keys = product_keys(heads, query_width, n_subkeys, query_norm, subspaces)
    return D * heads * query_width + keys + n_subkeys**subspaces * D


def transformer_block(branch: int) -> int:
    """x + Attn(norm x), then x + branch(norm x): two RMSNorms."""
    return 2 * D + attention() + branch


def memory_block(branch: int, attn_output_projection: bool = False, output_gate: bool = False) -> int:
    """x + [g ⊙] branch(Attn'(norm x)): one RMSNorm, no attention output projection (unless
    `memory.attn_output_projection` keeps it), and the output gate g of width d if any."""
    return D + attention(output_projection=attn_output_projection) + branch + (D if output_gate else 0)


def language_model(blocks: list[int]) -> int:
    """Tied embedding (the head is the embedding matrix), the blocks and the final RMSNorm."""
    return V * D + sum(blocks) + D


T_FFN = transformer_block(swiglu())

# ---------------------------------------------------------------------------------------------
# What each layer must be.

BRANCH_CLASSES = {
    "ffn": SwiGLUFeedForward,
    "pkm": ProductKeyMemory,
    "multihead_pkm": MultiHeadProductKeyMemory,
    "hml": HeadwiseMemory,
}
BLOCK_CLASSES = {"transformer": TransformerBlock, "memory": MemoryBlock}


@dataclass(frozen=True)
class Layer:
    block: str
    branch: str
    params: int
    """The block's parameter count, from the formulas."""
    layout: Callable[[torch.nn.Module], None] | None = None
    """Checks of the branch's value layout (shapes, sizes, initialisation)."""
    source: tuple[str, int] | None = None
    """Up-scaled arms: ("copy" | "zeroed" | "memory", base block index) the weights come from."""
    attn_output_projection: bool = False
    """Memory blocks: the attention keeps its output projection W_O (full attention)."""
    output_gate: bool = False
    """Memory blocks: the branch output is multiplied by a per-channel gate of width d, from zero."""


def ffn_layout(hidden: int = FFN_HIDDEN) -> Callable[[torch.nn.Module], None]:
    def check(branch: torch.nn.Module) -> None:
        assert branch.gate_proj.weight.shape == branch.up_proj.weight.shape == (hidden, D)
        assert branch.down_proj.weight.shape == (D, hidden)

    return check


@dataclass(frozen=True)
class Retrieval:
    """The product-key retrieval knobs of `MemoryConfig` (the defaults: the kit before memory_health)."""

    topk: int = 16
    query_norm: str = "none"
    key_norm: str = "none"
    score_scale: float = 1.0
    per_head: bool = False
    """``memory.head_topk``: per-head k, each 1..n_subkeys, summing to H · topk (False: every head reads topk)."""


def check_product_keys(keys, spaces: int, query_width: int, n_subkeys: int, retrieval: Retrieval,
                       subspaces: int = 2) -> None:
    """A `ProductKeys`: a key space per query, k slots read, query/key normalisation and score scale."""
    half = query_width // subspaces
    if retrieval.per_head:  # each head keeps its first k_h of max k_h sorted reads; same reads in total
        ks = keys.head_keep.sum(-1)
        assert keys.head_keep.shape == (spaces, keys.topk) and keys.topk == int(ks.max())
        assert int(ks.sum()) == spaces * retrieval.topk and int(ks.min()) >= 1 and keys.topk <= n_subkeys
    else:
        assert keys.head_keep is None and keys.topk == retrieval.topk
    assert keys.subkeys.shape == (spaces, subspaces, n_subkeys, half)
    assert keys.n_subspaces == subspaces and keys.n_slots == n_subkeys**subspaces
    assert keys.score_scale == retrieval.score_scale  # the softmax's inverse temperature
    if retrieval.query_norm == "none":
        assert keys.query_norm is None
    else:  # a gain (and a layernorm bias) per space and half, from the identity
        norm = keys.query_norm
        assert norm is not None and norm.kind == retrieval.query_norm
        assert norm.weight.shape == (spaces, subspaces, half) and bool((norm.weight == 1).all())
        if retrieval.query_norm == "layernorm":
            assert norm.bias.shape == (spaces, subspaces, half) and not norm.bias.any()
        else:
            assert norm.bias is None
    # Sub-key rows as scored: as stored, or normalised (no gain) to unit RMS / zero mean and unit variance.
    assert keys.key_norm == retrieval.key_norm
    with torch.no_grad():
        scored = keys.scored_subkeys()
    if retrieval.key_norm == "none":
        assert torch.equal(scored, keys.subkeys)
    else:
        centred = scored - scored.mean(-1, keepdim=True) if retrieval.key_norm == "layernorm" else scored
        assert torch.allclose(centred.pow(2).mean(-1), torch.ones(()), atol=1e-2)  # stored rows: ~0.02
        assert retrieval.key_norm == "rmsnorm" or torch.allclose(scored.mean(-1), torch.zeros(()), atol=1e-5)


def hml_layout(
    values: str,
    n_subkeys: int,
    latent: int = 32,
    zero_values: bool = False,
    retrieval: Retrieval = Retrieval(),
    zero_head_proj: bool = False,
) -> Callable[[torch.nn.Module], None]:
    slots = n_subkeys**2

    def check(branch: torch.nn.Module) -> None:
        assert branch.layout == values and branch.combine == "concat"
        assert (branch.n_heads, branch.head_dim, branch.n_slots) == (H, DH, slots)
        # One product-key space per head, queried by that head's output (width d_h).
        check_product_keys(branch.keys, H, DH, n_subkeys, retrieval)
        if values == "hive":
            assert branch.values.weight.shape == (slots, latent)  # the latent bank
            assert branch.head_proj.shape == (H, latent, DH)  # a latent × d_h projection per head
            assert bool((branch.head_proj == 0).all()) == zero_head_proj
        else:
            tables = H if values == "per_head" else 1
            assert branch.values.weight.shape == (tables * slots, DH) and branch.head_proj is None
            assert not zero_head_proj
        assert bool((branch.values.weight == 0).all()) == zero_values

    return check


def pkm_layout(
    n_subkeys: int, heads: int = 1, query_width: int = D, zero_values: bool = False, retrieval: Retrieval = Retrieval(),
    subspaces: int = 2,
) -> Callable[[torch.nn.Module], None]:
    def check(branch: torch.nn.Module) -> None:
        assert branch.n_heads == heads
        assert branch.query_proj.weight.shape == (heads * query_width, D)  # `heads` learned queries of width c
        check_product_keys(branch.keys, heads, query_width, n_subkeys, retrieval, subspaces)  # a key space per query
        # One table of d-wide values, shared by the heads.
        assert branch.values.weight.shape == (n_subkeys**subspaces, D)
        assert bool((branch.values.weight == 0).all()) == zero_values

    return check


def ffn_layer(**kw) -> Layer:
    return Layer("transformer", "ffn", T_FFN, ffn_layout(), **kw)


@dataclass(frozen=True)
class Expected:
    layers: list[Layer]
    memory: int = 0
    """params/memory: product-key memory branches (keys, query norms, values, query and value projections);
    a memory block's output gate, like its attention, belongs to the block, not the branch, so it is
    in params/total and params/added but not here (`MidusLM.num_memory_parameters` sums branches)."""
    quoted: dict[str, int] = field(default_factory=dict)
    """Counts the documentation quotes (YAML header, experiments/README.md): must equal the formulas."""
    added: int | None = None
    """params/added of an up-scaled arm (None: not up-scaled)."""
    identity: bool | None = None
    """Up-scaled arms: the logits at insertion equal the base's (True) or differ (False)."""
    trainable: int | None = None
    """params/trainable when not everything trains (an up-scaled arm with a frozen base)."""
    optimizer: dict[str, object] = field(default_factory=dict)
    """`CausalLM` settings that only the optimizer reads (``memory_optimizer.learning_rate``, …, as dotted
    ``group.field``): the arm's values, if given."""

    @property
    def total(self) -> int:
        return language_model([layer.params for layer in self.layers])


def memory_layer(
    branch: str, branch_params: int, layout, attn_output_projection: bool = False, output_gate: bool = False, **kw
) -> Layer:
    params = memory_block(branch_params, attn_output_projection, output_gate)
    return Layer("memory", branch, params, layout, attn_output_projection=attn_output_projection,
                 output_gate=output_gate, **kw)


def t_m_t_m(
    branch: str, branch_params: int, layout, quoted: dict[str, int], memory: bool = True, **block: bool
) -> Expected:
    """A from-scratch T M T M model: memory blocks at layers 1 and 3 (`block`: `memory_layer`'s flags)."""
    m = memory_layer(branch, branch_params, layout, **block)
    return Expected([ffn_layer(), m, ffn_layer(), m], memory=2 * branch_params if memory else 0, quoted=quoted)


# The shipped memory arms' retrieval (the seeded memory study's choice, memory_seeds.yaml):
# rmsnorm queries, no key norm; k 32 from scratch (ablate_*), k 16 inserted (dus_vs_midus).
SCRATCH_KEYS = Retrieval(topk=32, query_norm="rmsnorm", key_norm="none")
INSERTED_KEYS = Retrieval(topk=16, query_norm="rmsnorm", key_norm="none")
# PKM arms share it (they were not studied on their own).
SCRATCH_PKM_KEYS = SCRATCH_KEYS
INSERTED_PKM_KEYS = INSERTED_KEYS
HIVE_64, PER_HEAD_64, SHARED_64 = (hml(values, 64, query_norm="rmsnorm") for values in ("hive", "per_head", "shared"))
PKM_64, MHPKM_64 = pkm(64, query_norm="rmsnorm"), pkm(64, heads=4, query_norm="rmsnorm")
# dus_vs_midus: n_subkeys 32, 1024 slots per space.
HIVE_32, PKM_32 = hml("hive", 32, query_norm="rmsnorm"), pkm(32, query_norm="rmsnorm")


def midus(branch: str, branch_params: int, layout, quoted: dict[str, int], output_gate: bool = False,
          attn_output_projection: bool = False) -> Expected:
    """T T M T T M: a memory block after base blocks 1 and 3, attention copied from the block before;
    an identity at insertion (zero values, zero head projections or a zero output gate)."""
    layers = []
    for base_index in range(4):
        layers.append(ffn_layer(source=("copy", base_index)))
        if base_index in (1, 3):
            m = memory_layer(branch, branch_params, layout, output_gate=output_gate, source=("memory", base_index),
                             attn_output_projection=attn_output_projection)
            layers.append(m)
    added = 2 * memory_block(branch_params, attn_output_projection, output_gate)
    return Expected(layers, memory=2 * branch_params, added=added, identity=True, quoted=quoted)


HIVE_32_LITERAL = hml("hive", 32, query_norm="none")
INSERTED_KEYS_LITERAL = Retrieval(topk=16, query_norm="none", key_norm="none")


def frozen(expected: Expected) -> Expected:
    """An up-scaled arm with its base frozen (``trainable: new``): only the added blocks train."""
    return dataclasses.replace(expected, trainable=expected.added)


BASE_4 = [ffn_layer() for _ in range(4)]


@dataclass(frozen=True)
class MemoryKnobs:
    """A memory_health.yaml arm: its HML memory (`MemoryConfig`'s names; values hive, latent 32 throughout)
    and the memory's optimizer settings (``model.memory_optimizer``'s, under their names before issue 28)."""

    n_subkeys: int
    topk: int
    query_norm: str
    zero_init_values: bool
    key_norm: str = "none"
    score_scale: float = 1.0
    zero_init_head_proj: bool = False
    output_gate: bool = False
    attn_output_projection: bool = False
    memory_lr: float = 0.0
    memory_lr_keys: bool = False
    memory_lr_schedule: str = "cosine"
    frozen_base: bool = False
    """model.upscale.trainable: new (only the inserted blocks train)."""

    def expected(self, inserted: bool) -> Expected:
        """From scratch (T M T M) or inserted after every 2nd block of the 4-block base (T T M T T M)."""
        params = hml("hive", self.n_subkeys, query_norm=self.query_norm)
        retrieval = Retrieval(self.topk, self.query_norm, self.key_norm, self.score_scale)
        layout = hml_layout("hive", self.n_subkeys, zero_values=self.zero_init_values, retrieval=retrieval,
                            zero_head_proj=self.zero_init_head_proj)
        if inserted:
            assert not self.attn_output_projection, "midus() expects memory blocks without W_O"
            expected = midus("hml", params, layout, {}, output_gate=self.output_gate)
        else:
            expected = t_m_t_m("hml", params, layout, {}, output_gate=self.output_gate,
                               attn_output_projection=self.attn_output_projection)
        optimizer = {
            f"memory_optimizer.{field}": getattr(self, name)
            for name, field in (("memory_lr", "learning_rate"), ("memory_lr_keys", "subkeys"),
                                ("memory_lr_schedule", "schedule"))
        }
        trainable = expected.added if self.frozen_base else None
        return dataclasses.replace(expected, optimizer=optimizer, trainable=trainable)


change = dataclasses.replace
# memory_health.yaml's base (model.config.memory and model.memory_optimizer): scratch_reference; every
# other scratch_* arm changes one knob of it (scratch_before and _qnorm_layernorm_lr01: several).
HEALTH_SCRATCH = MemoryKnobs(
    n_subkeys=64, topk=32, query_norm="rmsnorm", zero_init_values=False, memory_lr=0.03, memory_lr_keys=True
)
HEALTH_SCRATCH_ARMS = {
    "scratch_before": change(HEALTH_SCRATCH, query_norm="none", topk=16, memory_lr=0.0, memory_lr_keys=False),
    "scratch_qnorm_layernorm_lr01": change(
        HEALTH_SCRATCH, query_norm="layernorm", topk=16, memory_lr=0.01, memory_lr_keys=False
    ),
    "scratch_reference": HEALTH_SCRATCH,
    "scratch_k16": change(HEALTH_SCRATCH, topk=16),
    "scratch_n32": change(HEALTH_SCRATCH, n_subkeys=32),
    "scratch_key_norm": change(HEALTH_SCRATCH, key_norm="rmsnorm"),
    "scratch_score_scale_2": change(HEALTH_SCRATCH, score_scale=2.0),
    "scratch_n32_score_scale_2": change(HEALTH_SCRATCH, n_subkeys=32, score_scale=2.0),
    "scratch_memory_lr_constant": change(HEALTH_SCRATCH, memory_lr_schedule="constant"),
    "scratch_score_scale_2_lr_constant": change(HEALTH_SCRATCH, score_scale=2.0, memory_lr_schedule="constant"),
    "scratch_full_attention": change(HEALTH_SCRATCH, attn_output_projection=True),  # + d² per memory block
}
# Its inserted_before arm (the &inserted anchor): dus_vs_midus's memory (n 32, k 16, zero values), then
# inserted_reference's knobs with each identity-preserving initialisation.
HEALTH_INSERTED = MemoryKnobs(n_subkeys=32, topk=16, query_norm="none", zero_init_values=True)
HEALTH_INSERTED_REFERENCE = change(HEALTH_INSERTED, query_norm="rmsnorm", memory_lr=0.03, memory_lr_keys=True)
HEALTH_INSERTED_ARMS = {
    "inserted_before": HEALTH_INSERTED,
    "inserted_reference": HEALTH_INSERTED_REFERENCE,
    "inserted_score_scale_2": change(HEALTH_INSERTED_REFERENCE, score_scale=2.0),
    "inserted_frozen_base": change(HEALTH_INSERTED_REFERENCE, frozen_base=True),
    "inserted_key_norm": change(HEALTH_INSERTED_REFERENCE, key_norm="rmsnorm"),
    "inserted_zero_proj": change(HEALTH_INSERTED_REFERENCE, zero_init_values=False, zero_init_head_proj=True),
    "inserted_output_gate": change(HEALTH_INSERTED_REFERENCE, zero_init_values=False, output_gate=True),
}

# (YAML stem, arm): an ablation's arm by name; a single-run YAML is one arm, named None.
EXPECTED: dict[tuple[str, str | None], Expected] = {
    # "4 Transformer blocks, d 128, 0.9 M parameters"; experiments/README.md: 918,656.
    ("quickstart", None): Expected(BASE_4, quoted={"total": 918_656}),
    ("pretrain_base", "base"): Expected(BASE_4, quoted={"total": 918_656}),
    # "the same model with 6 blocks": dus_vs_midus's equal-depth control, trained from scratch.
    ("pretrain_base", "deep"): Expected(BASE_4 + BASE_4[:2], quoted={"total": 1_312_384}),
    # ablate_branches: the branch of the memory blocks at layers 1 and 3 of T M T M.
    ("ablate_branches", "ffn"): t_m_t_m("ffn", swiglu(), ffn_layout(), {"total": 885_632, "memory": 0}, memory=False),
    ("ablate_branches", "pkm"): t_m_t_m(
        "pkm", PKM_64, pkm_layout(64, retrieval=SCRATCH_PKM_KEYS), {"total": 1_688_704, "memory": 1_097_984}
    ),
    ("ablate_branches", "multihead_pkm"): t_m_t_m(
        "multihead_pkm", MHPKM_64, pkm_layout(64, heads=4, retrieval=SCRATCH_PKM_KEYS),
        {"total": 1_836_928, "memory": 1_246_208},
    ),
    ("ablate_branches", "hml_hive"): t_m_t_m(
        "hml", HIVE_64, hml_layout("hive", 64, retrieval=SCRATCH_KEYS), {"total": 877_696, "memory": 286_976}
    ),
    # ablate_hive: "Parameter budget per memory block: 143,488 / 532,608 / 139,392".
    ("ablate_hive", "hive"): t_m_t_m(
        "hml", HIVE_64, hml_layout("hive", 64, retrieval=SCRATCH_KEYS),
        {"total": 877_696, "memory": 286_976, "per_block": 143_488}
    ),
    ("ablate_hive", "per_head"): t_m_t_m(
        "hml", PER_HEAD_64, hml_layout("per_head", 64, retrieval=SCRATCH_KEYS),
        {"total": 1_655_936, "memory": 1_065_216, "per_block": 532_608}
    ),
    ("ablate_hive", "shared"): t_m_t_m(
        "hml", SHARED_64, hml_layout("shared", 64, retrieval=SCRATCH_KEYS),
        {"total": 869_504, "memory": 278_784, "per_block": 139_392}
    ),
    # dus_vs_midus: from the 4-block base; totals, added and memory params as experiments/README.md's table.
    ("dus_vs_midus", "base_continued"): Expected(
        [ffn_layer(source=("copy", i)) for i in range(4)],
        added=0,
        identity=True,
        quoted={"total": 918_656, "added": 0, "memory": 0},
    ),
    ("dus_vs_midus", "dus_interleave"): Expected(
        [
            ffn_layer(source=(kind, i))
            for i, kind in [(0, "copy"), (1, "copy"), (1, "zeroed"), (2, "copy"), (3, "copy"), (3, "zeroed")]
        ],
        added=2 * T_FFN,
        identity=True,
        quoted={"total": 1_312_384, "added": 393_728, "memory": 0},
    ),
    # "one zeroed copy after block 4: 5 blocks, adding 1.33x what midus_hml_hive adds".
    ("dus_vs_midus", "dus_one_copy"): Expected(
        [ffn_layer(source=(kind, i)) for i, kind in [*((i, "copy") for i in range(4)), (3, "zeroed")]],
        added=T_FFN,
        identity=True,
        quoted={"total": 1_115_520, "added": 196_864, "memory": 0},
    ),
    # "6 blocks trained from scratch": the deep base, continued as it is (nothing added).
    ("dus_vs_midus", "scratch_deep"): Expected(
        [ffn_layer(source=("copy", i)) for i in range(6)],
        added=0,
        identity=True,
        quoted={"total": 1_312_384, "added": 0, "memory": 0},
    ),
    # SOLAR with drop 1: blocks 0..2 of the first copy, 1..3 of the second.
    ("dus_vs_midus", "dus_solar"): Expected(
        [ffn_layer(source=("copy", i)) for i in (0, 1, 2, 1, 2, 3)],
        added=2 * T_FFN,
        identity=False,
        quoted={"total": 1_312_384, "added": 393_728, "memory": 0},
    ),
    ("dus_vs_midus", "midus_hml_hive"): midus(
        "hml",
        HIVE_32,
        hml_layout("hive", 32, zero_values=True, retrieval=INSERTED_KEYS),
        {"total": 1_066_624, "added": 147_968, "memory": 82_176},
    ),
    ("dus_vs_midus", "midus_pkm"): midus(
        "pkm",
        PKM_32,
        pkm_layout(32, zero_values=True, retrieval=INSERTED_PKM_KEYS),
        {"total": 1_287_808, "added": 369_152, "memory": 303_360},
    ),
    # memory_health: no documented counts (yet); layouts and counts from the knobs above.
    **{("memory_health", arm): knobs.expected(inserted=False) for arm, knobs in HEALTH_SCRATCH_ARMS.items()},
    **{("memory_health", arm): knobs.expected(inserted=True) for arm, knobs in HEALTH_INSERTED_ARMS.items()},
    # memory_seeds(_inserted): memory_health's arms that its seed-0 run left standing.
    **{("memory_seeds", arm): HEALTH_SCRATCH_ARMS[arm].expected(inserted=False)
       for arm in ("scratch_before", "scratch_reference", "scratch_key_norm")},
    **{("memory_seeds_inserted", arm): HEALTH_INSERTED_ARMS[arm].expected(inserted=True)
       for arm in ("inserted_before", "inserted_reference")},
}
# The training protocol as an axis (dus_vs_midus, regime_x100_d128): each up-scaled arm also frozen
# (trainable: new), training exactly what it adds; the base before continued training (0 steps).
FROZEN_SOURCES = ("dus_interleave", "dus_solar", "dus_one_copy", "midus_hml_hive", "midus_pkm")
LITERAL = dataclasses.replace(frozen(midus(
    # The method notes' literal settings: no query norm (128 parameters fewer per block), memory at the base rate.
    "hml", HIVE_32_LITERAL, hml_layout("hive", 32, zero_values=True, retrieval=INSERTED_KEYS_LITERAL),
    {"added": 147_712},
)), optimizer={"memory_optimizer.learning_rate": 0})
EXPECTED.update({
    ("dus_vs_midus", "base"): EXPECTED[("dus_vs_midus", "base_continued")],
    **{("dus_vs_midus", f"{source}_frozen"): frozen(EXPECTED[("dus_vs_midus", source)]) for source in FROZEN_SOURCES},
    # SOLAR trains its whole second copy (3 blocks), one block more than it adds.
    ("dus_vs_midus", "dus_solar_frozen"): dataclasses.replace(EXPECTED[("dus_vs_midus", "dus_solar")],
                                                              trainable=3 * T_FFN),
    ("dus_vs_midus", "midus_literal_frozen"): LITERAL,
})
EXPECTED.update({
    # absorption_x100_d128: the base continued as it is, on populations of four sizes.
    **{("absorption_x100_d128", f"pop_{n}"): EXPECTED[("dus_vs_midus", "base_continued")]
       for n in (150, 300, 600, 1200)},
    # Full attention (W_O kept) in the memory blocks, against Attn': what the reviewers asked for.
    ("regime_x100_d128", "midus_full_attn_frozen"): frozen(midus(
        "hml", HIVE_32, hml_layout("hive", 32, zero_values=True, retrieval=INSERTED_KEYS),
        {"added": 180_736}, attn_output_projection=True,
    )),
    **{("regime_x100_d128", arm): EXPECTED[("dus_vs_midus", arm)]
       for arm in ("base", "base_continued", "dus_interleave", "midus_hml_hive", "midus_literal_frozen",
                   *(f"{source}_frozen" for source in FROZEN_SOURCES if source != "dus_solar"))},
    # subspaces_x100_d128: PKM (queries of 96) over 64² or 16³ = 4096 slots, frozen base, as its header.
    ("subspaces_x100_d128", "base"): EXPECTED[("dus_vs_midus", "base")],
    **{("subspaces_x100_d128", f"midus_p{p}_frozen"): frozen(midus(
        "pkm", pkm(n, query_width=96, query_norm="rmsnorm", subspaces=p),
        pkm_layout(n, query_width=96, zero_values=True, retrieval=INSERTED_PKM_KEYS, subspaces=p), {"added": added},
    )) for p, n, added in ((2, 64, 1_151_424), (3, 16, 1_142_208))},
})
EXPECTED.update({
    # sparse_memory_x100_d128: regime_x100_d128's frozen arms; the sparse arms build midus_hml_hive_frozen's
    # model (their value rows are chosen and split when a fit starts, test_sparse_memory_arms_... below).
    **{("sparse_memory_x100_d128", arm): EXPECTED[("regime_x100_d128", arm)]
       for arm in ("base", "dus_interleave_frozen", "midus_hml_hive_frozen")},
    **{("sparse_memory_x100_d128", f"sparse_t{t}"): EXPECTED[("regime_x100_d128", "midus_hml_hive_frozen")]
       for t in (64, 256)},
    # head_alloc_x100_d128: regime_x100_d128's frozen HML+HIVE, uniform and importance-weighted reads,
    # "both memory arms add 147,968 parameters".
    ("head_alloc_x100_d128", "base"): EXPECTED[("dus_vs_midus", "base")],
    ("head_alloc_x100_d128", "midus_uniform_frozen"): EXPECTED[("regime_x100_d128", "midus_hml_hive_frozen")],
    ("head_alloc_x100_d128", "midus_head_importance_frozen"): frozen(midus(
        "hml", HIVE_32,
        hml_layout("hive", 32, zero_values=True, retrieval=dataclasses.replace(INSERTED_KEYS, per_head=True)),
        {"added": 147_968},
    )),
})

# pretrain_base's memory arm: the MIDUS shape (T T M T T M) with dus_vs_midus's memory blocks, trained from
# scratch (random values), "the same total as midus_hml_hive"; sparse_memory_pretrained_x100_d128 continues it
# as it is (every block a copy of its own, nothing added).
PRETRAINED_MEMORY = memory_layer("hml", HIVE_32, hml_layout("hive", 32, zero_values=False, retrieval=INSERTED_KEYS))
PRETRAINED_MEMORY_LAYERS = [ffn_layer(), ffn_layer(), PRETRAINED_MEMORY, ffn_layer(), ffn_layer(), PRETRAINED_MEMORY]
EXPECTED.update({
    ("pretrain_base", "memory"): Expected(
        PRETRAINED_MEMORY_LAYERS, memory=2 * HIVE_32, quoted={"total": 1_066_624, "memory": 82_176},
        optimizer={"memory_optimizer.learning_rate": 0.03, "memory_optimizer.subkeys": True},
    ),
    **{("sparse_memory_pretrained_x100_d128", arm): Expected(
        # Trained weights: the layout's initial values do not hold; each block is checked as a copy of its own.
        [dataclasses.replace(layer, source=("copy", index), layout=None)
         for index, layer in enumerate(PRETRAINED_MEMORY_LAYERS)],
        memory=2 * HIVE_32, added=0, identity=True, quoted={"total": 1_066_624, "added": 0, "memory": 82_176},
    ) for arm in ("base", "full_finetune", "values_t1024", "values_t256", "values_t64")},
    # Issue 29's arms in the flagship's cell: head-importance reads (both protocols), sparse rows of
    # midus_hml_hive_frozen's model, and PKM over 64² or 16³ = 4096 slots (queries of 96), trainable.
    ("dus_vs_midus", "midus_head_importance"): dataclasses.replace(
        EXPECTED[("head_alloc_x100_d128", "midus_head_importance_frozen")], trainable=None),
    ("dus_vs_midus", "midus_head_importance_frozen"): EXPECTED[("head_alloc_x100_d128",
                                                                "midus_head_importance_frozen")],
    **{("dus_vs_midus", f"sparse_t{t}"): EXPECTED[("dus_vs_midus", "midus_hml_hive_frozen")] for t in (64, 256)},
    **{("dus_vs_midus", f"midus_pkm_p{p}"): dataclasses.replace(
        EXPECTED[("subspaces_x100_d128", f"midus_p{p}_frozen")], trainable=None) for p in (2, 3)},
})

# ---------------------------------------------------------------------------------------------
# Resolving and building arms the way the kit does.


OWN_SHAPES = {
    "capacity": "tests/test_capacity.py",
    "pretrain_wide": "tests/test_regime_wide.py",
    "regime_x100_d384": "tests/test_regime_wide.py",
}
"""YAMLs whose arms are not the kit's d-128 model family checked here, and where they are checked."""


def discover() -> list[tuple[str, str | None]]:
    """Every (YAML stem, arm) under experiments/ but `OWN_SHAPES`; a YAML without an ablation section is
    one arm (None)."""
    found: list[tuple[str, str | None]] = []
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        if path.stem in OWN_SHAPES:
            continue
        ablation = load_ablation(path)
        found += [(path.stem, arm) for arm in ablation.arms] if ablation else [(path.stem, None)]
    return found


ARMS = discover()


def arm_id(key: tuple[str, str | None]) -> str:
    return key[0] if key[1] is None else f"{key[0]}:{key[1]}"


def merged_config(stem: str, arm: str | None) -> dict:
    """The arm's full single-run config: `Ablation.arm_config`, or the YAML itself."""
    path = EXPERIMENTS / f"{stem}.yaml"
    ablation = load_ablation(path)
    if ablation is None:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    return ablation.arm_config(arm)


@functools.cache
def parse_arm(stem: str, arm: str | None, *extra: str):
    """The arm's ``fit`` namespace from the kit's parser; ablation arms go through the runner's `plan_arm`.

    Cached (parsing costs a tenth of a second or more): callers only read the namespace."""
    path = EXPERIMENTS / f"{stem}.yaml"
    if arm is None:
        return parse_only(["fit", "--config", str(path), *extra])
    command = parse_command_line(["fit", "--config", str(path), *extra])
    plan = plan_arm(command, arm)  # the runner's own validation (names the arm on failure)
    return parse_only(command.for_arm(yaml.safe_dump(plan.config, sort_keys=False)))


def data_vocab_size(data) -> int:
    """data.vocab_size without preparing the corpus: a kit BPE has exactly bpe_vocab_size entries.

    ``tokenizer: hf`` here names a BPE the kit cached (``<corpus key>-bpe<N>``; see
    `test_dus_vs_midus_reads_what_pretrain_base_writes`), of N entries.
    """
    if data.tokenizer == "bpe" or (data.tokenizer == "auto" and not data.tokenizer_path):
        return data.bpe_vocab_size  # auto without a starting model (these callers have none) is the BPE
    match = re.fullmatch(r".*-bpe(\d+)", Path(data.tokenizer_path).name)
    assert data.tokenizer == "hf" and match, (
        f"cannot tell the vocabulary of data.tokenizer={data.tokenizer!r} without preparing data"
    )
    return int(match.group(1))


def build(parsed) -> CausalLM:
    """The `CausalLM` the CLI would instantiate from `parsed`, with the data's vocabulary linked in."""
    arguments = parsed.model.as_dict()
    # What MidusCLI's link data.vocab_size -> model.config.vocab_size does at instantiation.
    config = ModelConfig(**{**arguments.pop("config"), "vocab_size": data_vocab_size(parsed.data)})
    upscale = UpscaleConfig(**arguments.pop("upscale"))
    groups = {name: group(**arguments.pop(name)) for name, group in GROUPS.items()}  # as jsonargparse builds them
    torch.manual_seed(0)
    # What the link data -> model.allocation_data gives memory_allocation: head_importance: training
    # blocks (random ones here, no corpus prepared) and the batch size.
    blocks = torch.randint(0, config.vocab_size, (8, 33), generator=torch.Generator().manual_seed(2))
    data = SimpleNamespace(train_blocks=[{"input_ids": row} for row in blocks], settings={"batch_size": 4})
    return CausalLM(config=config, upscale=upscale, **groups, **arguments, allocation_data=data).eval()


def input_ids(vocab_size: int = V) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


@dataclass
class Base:
    checkpoint: Path
    module: CausalLM
    deep: Base | None = None
    """The 6-block base (pretrain_base's deep arm), read by arms whose base_checkpoint is that run's."""
    memory: Base | None = None
    """The pretrained memory model (pretrain_base's memory arm), likewise."""


def random_base(arm: str, directory: Path, deep: Base | None = None, memory: Base | None = None) -> Base:
    """A random-weight pretrain_base.yaml model, saved as `CausalLM.on_save_checkpoint` saves it."""
    module = build(parse_arm("pretrain_base", arm))
    with torch.no_grad():  # norms start at one: give every weight a value, so copies are checkable
        for parameter in module.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    path = directory / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), MODEL_CONFIG_KEY: dataclasses.asdict(module.model.config)}, path)
    return Base(path, module, deep, memory)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """The 4-block base, its 6-block counterpart as `Base.deep` and the pretrained memory model as `Base.memory`."""
    deep = random_base("deep", tmp_path_factory.mktemp("pretrain_deep"))
    memory = random_base("memory", tmp_path_factory.mktemp("pretrain_memory"))
    return random_base("base", tmp_path_factory.mktemp("pretrain_base"), deep, memory)


def base_of(stem: str, arm: str | None, base: Base) -> Base:
    """The random base an arm reads: the deep one or the memory one when its base_checkpoint is
    pretrain_base's deep or memory run."""
    checkpoint = str(((merged_config(stem, arm).get("model") or {}).get("upscale") or {}).get("base_checkpoint"))
    for arm_name in ("deep", "memory"):
        if f"/pretrain_base/{arm_name}/" in checkpoint:
            return getattr(base, arm_name)
    return base


def build_arm(stem: str, arm: str | None, base: Base | None) -> CausalLM:
    upscale = (merged_config(stem, arm).get("model") or {}).get("upscale") or {}
    if base is not None:
        base = base_of(stem, arm, base)
    extra = ["--model.upscale.base_checkpoint", str(base.checkpoint)] if upscale.get("base_checkpoint") else []
    return build(parse_arm(stem, arm, *extra))


def identity_by_settings(settings: UpscaleConfig) -> bool:
    """Whether the kit documents the up-scaling as identical at insertion (README's table; MIDUS:
    `MemoryConfig`'s zero_init_values, zero_init_head_proj and output_gate)."""
    memory = settings.memory
    midus_identity = (
        memory.zero_init_values  # every value row zero: the branch returns zero
        or memory.output_gate  # g = 0 multiplies whatever the branch returns
        or (settings.branch == "hml" and memory.values == "hive" and memory.zero_init_head_proj)  # P_h = 0
    )
    return {
        "none": True,
        "dus_interleave": True,
        "dus_top": settings.zero_init_copies,
        "midus": midus_identity,
    }.get(settings.method, False)


# ---------------------------------------------------------------------------------------------
# The tests.


def test_every_expectation_names_an_existing_arm() -> None:
    stale = sorted(map(arm_id, set(EXPECTED) - set(ARMS)))
    assert not stale, f"EXPECTED lists arms no experiments/*.yaml has: {stale}"


def test_quoted_counts_match_the_formulas() -> None:
    """The documented numbers are what the architecture's formulas give (checked without building)."""
    for key, expected in EXPECTED.items():
        computed = {"total": expected.total, "memory": expected.memory, "added": expected.added}
        if "per_block" in expected.quoted:
            computed["per_block"] = expected.memory // 2
        for name, value in expected.quoted.items():
            assert computed[name] == value, (
                f"{arm_id(key)}: documented {name} {value:,}, formulas give {computed[name]:,}"
            )
    # "0.9 M parameters" (quickstart, pretrain_base); "ffn hidden 384"; "3.7× HIVE" (ablate_hive).
    assert round(EXPECTED[("quickstart", None)].total / 1e6, 1) == 0.9
    assert ModelConfig(vocab_size=V, d_model=D).ffn_width == FFN_HIDDEN
    assert round(PER_HEAD_64 / HIVE_64, 1) == 3.7
    # dus_vs_midus.yaml: "1024 slots per head: a memory block adds ~1/3 of what a copied block adds"
    # (the default branch, hml + hive: 73,856 / 196,864 = 0.375).
    assert abs(memory_block(HIVE_32) / T_FFN - 1 / 3) < 0.05
    # dus_vs_midus.yaml: dus_one_copy adds "1.33x what midus_hml_hive adds", midus_pkm "0.94x what dus_interleave adds".
    added = {arm: EXPECTED[("dus_vs_midus", arm)].added for arm in ("dus_one_copy", "midus_hml_hive", "dus_interleave")}
    assert round(added["dus_one_copy"] / added["midus_hml_hive"], 2) == 1.33
    assert round(EXPECTED[("dus_vs_midus", "midus_pkm")].added / added["dus_interleave"], 2) == 0.94


@pytest.mark.parametrize("key", ARMS, ids=map(arm_id, ARMS))
def test_arm_builds_what_its_comment_claims(key: tuple[str, str | None], base: Base) -> None:
    stem, arm = key
    module = build_arm(stem, arm, base)
    base = base_of(stem, arm, base)
    model = module.model
    settings = UpscaleConfig(**(merged_config(stem, arm).get("model") or {}).get("upscale", {}))
    upscaled = settings.enabled
    if upscaled:
        # Whatever the arm, an up-scaling the kit documents as an identity must be one.
        logits_equal = _logits_equal(model, base.module.model)
        assert logits_equal == identity_by_settings(settings), f"{arm_id(key)}: identical at insertion: {logits_equal}"
    expected = EXPECTED.get(key)
    if expected is None:
        pytest.fail(
            f"{arm_id(key)} has no expectations: add EXPECTED[{key!r}] to tests/test_experiment_arms.py "
            f"(it builds {[(s.block, s.branch) for s in model.config.stack]}, {model.num_parameters():,} parameters)"
        )

    # Block kind and branch per layer: in the config and in the modules built from it.
    built = [(spec.block, spec.branch) for spec in model.config.stack]
    assert built == [(layer.block, layer.branch) for layer in expected.layers]
    assert len(model.blocks) == len(expected.layers)
    assert (model.config.d_model, model.config.n_heads, model.config.kv_heads, model.config.head_dim) == (D, H, KV, DH)
    assert model.config.vocab_size == V and model.config.tie_embeddings and model.lm_head.weight is model.embed.weight
    for index, (block, layer) in enumerate(zip(model.blocks, expected.layers)):
        where = f"{arm_id(key)}: block {index}"
        assert type(block) is BLOCK_CLASSES[layer.block], where
        assert type(block.branch) is BRANCH_CLASSES[layer.branch], where  # exact: PKM subclasses multi-head PKM
        if layer.block == "memory":
            # M = x + [g ⊙] branch(Attn'(norm x)): no output projection (unless kept), no internal residual.
            assert (block.attn.o_proj is not None) == layer.attn_output_projection, where
            assert not block.internal_residual, where
            gate = block.output_gate
            assert (gate is not None) == layer.output_gate, where
            assert gate is None or (gate.shape == (D,) and not gate.any()), where  # g starts at zero
        if layer.layout is not None:
            layer.layout(block.branch)
        assert sum(p.numel() for p in block.parameters()) == layer.params, where

    # Parameter counts, as CausalLM.on_fit_start logs them (params/total, trainable, memory, added).
    assert model.num_parameters() == expected.total
    # Everything trains (trainable: all) unless the arm freezes its base (trainable: new).
    assert model.num_parameters(trainable_only=True) == (expected.trainable or expected.total)
    assert model.num_memory_parameters() == expected.memory
    assert module.added_parameters == (expected.added or 0)
    for name, value in expected.optimizer.items():
        group, field = name.split(".")
        actual = getattr(module.hparams[group], field)
        assert actual == value, f"{arm_id(key)}: model.{name} is {actual!r}"
    assert upscaled == (expected.added is not None)
    if upscaled:
        assert module.base_parameters == base.module.model.num_parameters()
        assert logits_equal == expected.identity
        _check_weights_come_from_their_source(model, base.module.model, expected.layers)


def _logits_equal(model: torch.nn.Module, base_model: torch.nn.Module) -> bool:
    ids = input_ids()
    with torch.no_grad():
        return torch.equal(model.eval()(ids), base_model.eval()(ids))


def _check_weights_come_from_their_source(model, base_model, layers: list[Layer]) -> None:
    base_state = base_model.state_dict()
    for name in ("embed.weight", "norm.weight"):
        assert torch.equal(model.state_dict()[name], base_state[name])
    for index, layer in enumerate(layers):
        kind, source = layer.source
        for name, value in model.blocks[index].state_dict().items():
            original = base_state[f"blocks.{source}.{name}"] if f"blocks.{source}.{name}" in base_state else None
            if kind == "copy":
                assert torch.equal(value, original), f"block {index}: {name} is not base block {source}'s"
            elif kind == "zeroed":  # LLaMA Pro: only the two projections into the residual stream are zero
                if name in ("attn.o_proj.weight", "branch.down_proj.weight"):
                    assert not value.any(), f"block {index}: {name} is not zeroed"
                else:
                    assert torch.equal(value, original), f"block {index}: {name} is not base block {source}'s"
            elif name.startswith(("attn_norm.", "attn.")):  # a memory block: attention copied (attn_init: copy)
                assert torch.equal(value, original), f"block {index}: {name} is not base block {source}'s"


def test_the_base_checkpoint_reads_back_as_the_base(base: Base) -> None:
    model = load_kit_checkpoint(base.checkpoint)
    assert model.config == base.module.model.config
    assert _logits_equal(model, base.module.model)


def test_pretrain_base_is_the_quickstart_model() -> None:
    """pretrain_base.yaml: "the quickstart model (4 Transformer blocks, d 128, 0.9 M parameters)"."""
    quickstart, pretrain = parse_arm("quickstart", None), parse_arm("pretrain_base", "base")
    assert quickstart.model.config.as_dict() == pretrain.model.config.as_dict()
    assert data_vocab_size(quickstart.data) == data_vocab_size(pretrain.data) == V


def written_checkpoint(arm: str) -> Path:
    """Where pretrain_base.yaml's `arm` run writes its last.ckpt."""
    pretrain = parse_arm("pretrain_base", arm)
    logger = pretrain.trainer.logger.init_args
    checkpoints = [cb.init_args for cb in pretrain.trainer.callbacks if cb.class_path.endswith("ModelCheckpoint")]
    assert any(c.save_last and c.dirpath is None for c in checkpoints)  # <log dir>/checkpoints/last.ckpt
    return Path(logger.save_dir) / logger.name / str(logger.version) / "checkpoints" / "last.ckpt"


def test_dus_vs_midus_reads_what_pretrain_base_writes() -> None:
    """Its base checkpoints and tokenizer are the paths pretrain_base.yaml's runs write, and its
    data is "population B (600 new people, seed 1, 16 biographies each) plus a 25 % replay share of
    population A (the base run's own documents)"."""
    data = parse_arm("pretrain_base", "base").data
    assert parse_arm("pretrain_base", "deep").data == data  # both bases read the same text
    corpus_key = embedded_key(data.embedded.seed, data.embedded.num_people, data.embedded.docs_per_person)
    cached = Path(data.cache_dir) / "tokenizers" / f"{corpus_key}-bpe{data.bpe_vocab_size}"
    for arm in load_ablation(EXPERIMENTS / "dus_vs_midus.yaml").arms:
        parsed = parse_arm("dus_vs_midus", arm)
        base_arm = "deep" if arm == "scratch_deep" else "base"
        assert Path(parsed.model.upscale.base_checkpoint) == written_checkpoint(base_arm), arm
        # The sparse arms vary midus_hml_hive_frozen (their value rows alone train: freeze_rest).
        frozen_protocol = arm.endswith("_frozen") or arm.startswith("sparse_t")
        assert parsed.model.upscale.trainable == ("new" if frozen_protocol else "all"), arm
        assert (parsed.data.tokenizer, Path(parsed.data.tokenizer_path)) == ("hf", cached), arm
        embedded = parsed.data.embedded
        assert (embedded.seed, embedded.num_people, embedded.docs_per_person) == (1, 600, 16), arm
        assert (embedded.replay_seed, embedded.replay_share) == (data.embedded.seed, 0.25), arm
        assert (embedded.replay_num_people, embedded.replay_docs_per_person) == (
            data.embedded.num_people,
            data.embedded.docs_per_person,
        ), arm  # so the replay documents are exactly the base run's


def test_hive_and_hml_hive_are_the_same_run() -> None:
    """experiments/README.md: "The `hive` arm and `hml_hive` are the same configuration"."""
    hive, hml_hive = merged_config("ablate_hive", "hive"), merged_config("ablate_branches", "hml_hive")
    for config in (hive, hml_hive):
        config["trainer"].pop("logger")  # each ablation logs to its own directory
    assert hive == hml_hive


@pytest.mark.parametrize("arm", ["hive", "per_head", "shared"])
def test_hive_values_are_head_specific_and_shared_ones_are_not(arm: str) -> None:
    """ablate_hive.yaml: hive and per_head give head-specific values, shared gives none: the same
    retrieval in every head returns the same output only from one shared table."""
    model = build(parse_arm("ablate_hive", arm)).model
    weights = torch.softmax(torch.randn(1, 3, 1, 16, generator=torch.Generator().manual_seed(2)), -1)
    slots = torch.randint(0, 64**2, (1, 3, 1, 16), generator=torch.Generator().manual_seed(3))
    for index in (1, 3):
        branch = model.blocks[index].branch
        with torch.no_grad():
            out = branch.read(weights.expand(-1, -1, H, -1).contiguous(), slots.expand(-1, -1, H, -1).contiguous())
        heads = out.unflatten(-1, (H, DH))
        same = all(torch.equal(heads[..., 0, :], heads[..., h, :]) for h in range(1, H))
        assert bool(heads.abs().sum()) and same == (arm == "shared"), f"block {index}"


def test_regime_x100_d128_sees_each_new_fact_100_times_from_the_flagship_base() -> None:
    """regime_x100_d128.yaml: the flagship's base and tokenizer, "150 new people (population seed 3,
    25 biographies each, 5,592 bits) for 4 epochs: each new fact is seen 100 times", the base's own
    documents replayed, a tuning population the reported runs never read, and each arm's control."""
    import math

    from midus.data.corpus import ATTRIBUTES, value_choices

    flagship = parse_arm("dus_vs_midus", "base_continued")
    ablation = load_ablation(EXPERIMENTS / "regime_x100_d128.yaml")
    for arm in ablation.arms:
        parsed = parse_arm("regime_x100_d128", arm)
        assert parsed.model.upscale.base_checkpoint == flagship.model.upscale.base_checkpoint, arm
        assert (parsed.data.tokenizer, parsed.data.tokenizer_path) == ("hf", flagship.data.tokenizer_path), arm
        embedded = parsed.data.embedded
        assert embedded.docs_per_person * parsed.trainer.max_epochs == 100, arm
        assert (embedded.seed, embedded.num_people) == (3, 150), arm
        replay = ("replay_seed", "replay_num_people", "replay_docs_per_person", "replay_share")
        assert [getattr(embedded, k) for k in replay] == [getattr(flagship.data.embedded, k) for k in replay], arm
        frozen_arm = arm.endswith("_frozen")
        assert parsed.model.upscale.trainable == ("new" if frozen_arm else "all"), arm
        if arm != "base":
            assert ablation.control[arm] == ("base" if frozen_arm else "base_continued"), arm
    assert parse_arm("regime_x100_d128", "base").trainer.max_steps == 0  # the un-continued base
    bits = 150 * sum(math.log2(len(value_choices(attribute))) for attribute in ATTRIBUTES)
    assert round(bits) == 5_592
    # Tuning reads another population (not the flagship's 1 either), without the replay text.
    tuning = ablation.tune.overrides
    assert tuning["data.embedded.seed"] not in (3, flagship.data.embedded.seed)
    assert tuning["data.embedded.replay_validation"] is False
    assert ablation.tune.keep == {"midus_literal_frozen": ["model.memory_optimizer.learning_rate"]}


def test_sparse_memory_arms_are_regime_x100_d128s_frozen_cell_with_t_rows_per_block() -> None:
    """sparse_memory_x100_d128.yaml: regime_x100_d128's data, base and rates for every arm; "only 64 of each
    block's 1,024 bank rows train (... 2 x 64 x 32 = 4,096 trainable parameters)", 256 likewise (16,384),
    TF-IDF over one-sequence documents, everything else fixed; the other arms not sparse."""
    ablation = load_ablation(EXPERIMENTS / "sparse_memory_x100_d128.yaml")
    assert ablation.references == ["midus_hml_hive_frozen", "dus_interleave_frozen"]
    assert set(ablation.control) == set(ablation.arms) and set(ablation.control.values()) == {"base"}
    tuned = parse_arm("regime_x100_d128", "midus_hml_hive_frozen")
    for arm in ablation.arms:
        parsed = parse_arm("sparse_memory_x100_d128", arm)
        regime = tuned if arm.startswith("sparse_t") else parse_arm("regime_x100_d128", arm)
        assert parsed.data == regime.data
        assert parsed.model.upscale.base_checkpoint == regime.model.upscale.base_checkpoint
        sparse = parsed.model.sparse_memory
        if arm.startswith("sparse_t"):
            t = int(arm.removeprefix("sparse_t"))
            assert (sparse.trainable_slots, sparse.ranking, sparse.count_batch_size, sparse.freeze_rest) == (
                t, "tfidf", 1, True)
            assert parsed.model.upscale == tuned.model.upscale
            memory = tuned.model.upscale.memory
            assert 2 * t * memory.latent_dim == {64: 4_096, 256: 16_384}[t] and memory.n_subkeys**2 == 1024
        else:
            assert sparse.trainable_slots == 0
        if arm != "base":
            assert (parsed.model.optimizer, parsed.model.memory_optimizer, parsed.model.schedule) == (
                regime.model.optimizer, regime.model.memory_optimizer, regime.model.schedule), arm


def test_the_pretrained_memory_cell_continues_pretrain_base_memory_on_regime_x100_d128s_data() -> None:
    """sparse_memory_pretrained_x100_d128.yaml: "Every arm loads that model (no up-scaling) and continues on
    regime_x100_d128's new people"; t rows per block of the 1,024, everything else fixed; every trained arm
    at the candidate its tuning chose ("tuned: cos_4x" / "cos_8x"), tuned on another population."""
    ablation = load_ablation(EXPERIMENTS / "sparse_memory_pretrained_x100_d128.yaml")
    assert ablation.references == ["values_t1024", "full_finetune"]
    assert set(ablation.control) == set(ablation.arms) and set(ablation.control.values()) == {"base"}
    regime = parse_arm("regime_x100_d128", "midus_hml_hive_frozen")
    pretrained = parse_arm("pretrain_base", "memory")
    assert pretrained.model.config.memory == regime.model.upscale.memory.__class__(
        **{**regime.model.upscale.memory.as_dict(), "zero_init_values": False})  # the flagship's memory, trained
    tuned = {"full_finetune": "cos_4x", "values_t1024": "cos_8x", "values_t256": "cos_8x", "values_t64": "cos_8x"}
    for arm in ablation.arms:
        parsed = parse_arm("sparse_memory_pretrained_x100_d128", arm)
        assert parsed.data == regime.data, arm
        assert Path(parsed.model.upscale.base_checkpoint) == written_checkpoint("memory"), arm
        assert (parsed.model.upscale.method, parsed.model.upscale.trainable) == ("none", "all"), arm
        sparse = parsed.model.sparse_memory
        if arm.startswith("values_t"):
            t = int(arm.removeprefix("values_t"))
            assert (sparse.trainable_slots, sparse.ranking, sparse.count_batch_size, sparse.freeze_rest) == (
                t, "tfidf", 1, True), arm
        else:
            assert sparse.trainable_slots == 0, arm
        if arm in tuned:
            candidate = ablation.tune.candidates[tuned[arm]]
            rates = {"model.optimizer.learning_rate": parsed.model.optimizer.learning_rate,
                     "model.memory_optimizer.learning_rate": parsed.model.memory_optimizer.learning_rate,
                     "model.schedule.min_lr_ratio": parsed.model.schedule.min_lr_ratio}
            assert rates == candidate, arm
    assert set(tuned) == set(ablation.arms) - {"base"}
    assert ablation.tune.overrides["data.embedded.seed"] != regime.data.embedded.seed  # not the reported people


def test_absorption_populations_see_each_fact_100_times_and_hold_the_quoted_bits() -> None:
    """absorption_x100_d128.yaml: "pop_N  N people, B bits", 25 biographies x 4 epochs, no replay."""
    import math

    from midus.data.corpus import ATTRIBUTES, value_choices

    per_person = sum(math.log2(len(value_choices(attribute))) for attribute in ATTRIBUTES)
    header = (EXPERIMENTS / "absorption_x100_d128.yaml").read_text()
    for arm in load_ablation(EXPERIMENTS / "absorption_x100_d128.yaml").arms:
        parsed = parse_arm("absorption_x100_d128", arm)
        embedded = parsed.data.embedded
        assert arm == f"pop_{embedded.num_people}" and embedded.seed == 3
        assert embedded.docs_per_person * parsed.trainer.max_epochs == 100 and embedded.replay_seed == -1  # no replay
        assert parsed.model.upscale.trainable == "all" and parsed.model.optimizer.learning_rate == 0.002
        assert re.search(rf"{embedded.num_people:,} people, +{round(embedded.num_people * per_person):,} bits", header)
