"""Settings shared by every product-key memory branch and by memory blocks.

Each open point of the method (see the MIDUS method notes: query normalisation, latent
width, how heads combine, the internal residual) is a field here, so an ablation can
decide it instead of the code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MemoryConfig:
    """Product-key memory: retrieval sizes, value layout and the memory block's wiring.

    Every field's help starts with who reads it: ``[pkm, multihead_pkm, hml]`` (every
    product-key branch), ``[hml]``, ``[pkm, multihead_pkm]`` or ``[memory block]`` (the
    block, whatever its branch). A field is ignored by the branches it does not name.
    """

    # Retrieval and values of every product-key branch.
    n_subkeys: int = 64
    """[pkm, multihead_pkm, hml] Sub-keys per half-key table (n); every head's memory has n² slots
    (n ** `n_subspaces` in general)."""
    topk: int = 16
    """[pkm, multihead_pkm, hml] Slots each query reads (k), also the per-half shortlist size;
    at most `n_subkeys`."""
    n_subspaces: int = 2
    """[pkm, multihead_pkm, hml] Sub-spaces p of the product keys (PEER's product keys over p ≥ 2 parts):
    each query splits into p equal parts, each scored against its own table of `n_subkeys` sub-keys,
    so every memory has N = n_subkeys ** n_subspaces slots. 2 is the original two halves (n² slots).
    The query width (HML: head_dim; PKM: `pkm_query_dim`) must divide by p."""
    query_norm: Literal["none", "layernorm", "rmsnorm"] = "rmsnorm"
    """[pkm, multihead_pkm, hml] Normalisation of each query half before scoring it against the
    sub-keys. Per token, so it is causal; batch norm (original PKM) is deliberately not offered.
    ``rmsnorm`` by the memory_health study: without it an inserted memory never engaged and a
    from-scratch one was not read for recall (experiments/README.md)."""
    key_norm: Literal["none", "layernorm", "rmsnorm"] = "none"
    """[pkm, multihead_pkm, hml] Normalisation of every sub-key row (no gain) before scoring, as
    later PKM work normalises keys: ``layernorm`` gives each row zero mean and unit variance,
    ``rmsnorm`` unit root mean square, so no key wins by its length alone. With normalised
    queries the scores then grow with the query width: for HML (width d_h = 32) ``rmsnorm`` was
    the memory_health study's best setting (lowest loss, entropy 0.13 of log k) and the shipped
    HML configs set it; for PKM and multi-head PKM (width 128) it made retrieval one-hot
    (entropy 0.00) and the memory harmful, so it is not the default (experiments/README.md)."""
    score_scale: float = 1.0
    """[pkm, multihead_pkm, hml] Factor on the k retrieval scores before their softmax (an inverse
    temperature): above 1 sharpens the retrieval weights (lower entropy), below 1 flattens them.
    Which k slots are read does not change. Flat weights (entropy near log k) are what an unused
    memory shows; 1 is the original PKM. (In the memory_health study 2 sharpened un-normalised
    keys, entropy 0.86 → 0.60 of log k; normalised keys are sharper still.)"""
    zero_init_values: bool = True
    """[pkm, multihead_pkm, hml] Start memory values (HIVE bank, value tables) at zero: a memory
    block is then an exact identity until training moves them."""
    # HML only.
    values: Literal["hive", "per_head", "shared"] = "hive"
    """[hml] Value layout: ``hive`` = one latent bank (n² × latent_dim) per block plus a
    latent_dim × head_dim projection per head; ``per_head`` = one n² × head_dim table per
    head; ``shared`` = one n² × head_dim table read by every head."""
    zero_init_head_proj: bool = False
    """[hml] With ``values: hive``, start the per-head projections P_h at zero instead of random. With
    ``zero_init_values: false`` (a random bank) this is the other exact identity at insertion:
    the block adds nothing until P_h moves, and P_h gets gradient from the first step (with a
    zero bank and random P_h the bank does instead)."""
    latent_dim: int = 32
    """[hml] HIVE latent width d_l: rows of the shared bank, before each head's projection
    (``values: hive`` only)."""
    head_topk: list[list[int]] = field(default_factory=list)
    """[hml] Per-head slot reads: one row per HML memory block (in stack order), one k_h per head,
    each 1..`n_subkeys`, each row summing to n_heads · `topk` (the uniform allocation's total, so
    reads and parameters stay those of uniform `topk`). Empty (the default): every head reads
    `topk`. Each head retrieves the max k_h best slots and keeps its own k_h best (the others get
    weight zero, outside the softmax). ``model.upscale.memory_allocation: head_importance`` fills
    it from the base's attention-head importance (docs/memory.md)."""
    combine: Literal["concat", "sum"] = "concat"
    """[hml] How the heads form the output: ``concat`` head-wise outputs of head_dim (the paper's
    default), or ``sum`` of outputs projected to d_model. A model whose heads are decoupled
    (n_heads · head_dim ≠ d_model, Qwen3-0.6B) needs ``sum``: concat would be n_heads · head_dim
    wide, and ``sum`` brings every head back to d_model through its own values (HIVE: P_h is
    latent_dim × d_model), with no projection across heads."""
    # PKM and multi-head PKM only.
    pkm_query_dim: int = 0
    """[pkm, multihead_pkm] Width of each learned query (both halves together); 0 means d_model."""
    pkm_heads: int = 0
    """[multihead_pkm] Query heads; 0 means the model's n_heads (PKM always has one)."""
    # The memory block itself.
    internal_residual: bool = False
    """[memory block] Query the branch with x + Attn'(norm x) instead of the attention heads
    alone (the paper reports this weakens retrieval; kept for the ablation). Needs coupled heads
    (n_heads · head_dim = d_model): x and the heads are added."""
    output_gate: bool = False
    """[memory block] Multiply the branch output by a learned per-channel gate g (d_model) that starts
    at zero, M(x) = x + g ⊙ branch(·) (LayerScale/ReZero-style): the block is an exact identity at
    insertion whatever the memory's initialisation (so values can start random), and g learns from
    the first step while the memory receives gradient once g has moved."""
    attn_output_projection: bool = False
    """[memory block] Keep the attention's output projection W_O and query the branch with the
    projected heads (full attention) instead of the paper's Attn′ without W_O: separates the
    effect of Attn′ from that of the memory. Up-scaling with ``attn_init: copy`` copies W_O too.
    With decoupled heads HML refuses it (the projection no longer splits into head-wise queries);
    PKM and multi-head PKM then read the d_model-wide projection."""

    def validate(self, d_model: int, n_heads: int) -> None:
        """Raise ValueError naming the first ``memory.*`` field that is out of range."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"model config: memory.{message}")

        need(self.n_subkeys > 0, f"n_subkeys must be positive, got {self.n_subkeys}")
        need(self.topk > 0, f"topk must be positive, got {self.topk}")
        need(
            self.topk <= self.n_subkeys,
            f"topk={self.topk} is larger than memory.n_subkeys={self.n_subkeys}: each half-key "
            "shortlist keeps topk of n_subkeys scores",
        )
        need(
            self.key_norm in ("none", "layernorm", "rmsnorm"),
            f"key_norm={self.key_norm!r}; expected none, layernorm or rmsnorm",
        )
        need(
            math.isfinite(self.score_scale) and self.score_scale > 0,
            f"score_scale must be a positive number, got {self.score_scale}",
        )
        need(
            not self.zero_init_head_proj or self.values == "hive",
            f"zero_init_head_proj needs memory.values=hive (the layout with projections), got {self.values!r}",
        )
        # Two zero factors in a product: neither gets a gradient, so the memory never trains.
        need(
            not (self.zero_init_head_proj and self.zero_init_values),
            "zero_init_head_proj with memory.zero_init_values=true starts both the bank and its projections at "
            "zero, so neither ever gets a gradient; set memory.zero_init_values: false (a random bank)",
        )
        need(
            not (self.output_gate and self.zero_init_values),
            "output_gate with memory.zero_init_values=true starts the gate and the values at zero, so neither "
            "ever gets a gradient; set memory.zero_init_values: false (the gate alone keeps the identity)",
        )
        self._validate_head_topk(n_heads)
        need(self.latent_dim > 0, f"latent_dim must be positive, got {self.latent_dim}")
        need(self.pkm_query_dim >= 0, f"pkm_query_dim must be 0 (= d_model) or positive, got {self.pkm_query_dim}")
        need(
            self.query_dim(d_model) % 2 == 0,
            f"pkm_query_dim={self.query_dim(d_model)} cannot be split into two halves; use an even width",
        )
        need(self.n_subspaces >= 2, f"n_subspaces must be at least 2 (the two halves of PKM), got {self.n_subspaces}")
        need(self.pkm_heads >= 0, f"pkm_heads must be 0 (= n_heads) or positive, got {self.pkm_heads}")
        need(
            self.values in ("hive", "per_head", "shared"), f"values={self.values!r}; expected hive, per_head or shared"
        )
        need(self.combine in ("concat", "sum"), f"combine={self.combine!r}; expected concat or sum")
        need(
            self.query_norm in ("none", "layernorm", "rmsnorm"),
            f"query_norm={self.query_norm!r}; expected none, layernorm or rmsnorm",
        )

    def _validate_head_topk(self, n_heads: int) -> None:
        for row, ks in enumerate(self.head_topk):
            where = f"model config: memory.head_topk[{row}]={list(ks)}"
            if len(ks) != n_heads:
                raise ValueError(f"{where} has {len(ks)} entries; expected one per head ({n_heads})")
            if any(not 1 <= k <= self.n_subkeys for k in ks):
                raise ValueError(
                    f"{where}: every head's k must be between 1 and memory.n_subkeys={self.n_subkeys} (each "
                    "half-key shortlist keeps the largest k of n_subkeys scores)"
                )
            if sum(ks) != n_heads * self.topk:
                raise ValueError(
                    f"{where} sums to {sum(ks)}; expected n_heads · memory.topk = {n_heads} · {self.topk} = "
                    f"{n_heads * self.topk}, the reads of the uniform allocation"
                )

    @property
    def retrieved_topk(self) -> int:
        """Slots every head retrieves (and scores) per query: `topk`, or with `head_topk` its largest k
        (the heads with a smaller k weight the rest 0), which is what retrieval costs."""
        return max((k for row in self.head_topk for k in row), default=self.topk)

    @property
    def n_slots(self) -> int:
        """Slots per product-key space (n ** p: n² by default)."""
        return self.n_subkeys**self.n_subspaces

    def subspaces_error(self, query_width: int, field: str) -> str | None:
        """Why queries of `query_width` (named `field` in the message) cannot split into
        `n_subspaces` equal parts; None when they can."""
        if query_width % self.n_subspaces == 0:
            return None
        return (f"memory.n_subspaces={self.n_subspaces} does not split the queries ({field}={query_width}) into "
                "equal parts; use a number of sub-spaces that divides it")

    def query_dim(self, d_model: int) -> int:
        """Resolved PKM query width."""
        return self.pkm_query_dim or d_model

    def query_heads(self, n_heads: int) -> int:
        """Resolved multi-head PKM head count."""
        return self.pkm_heads or n_heads
