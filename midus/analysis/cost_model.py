"""FLOPs and bytes of one Transformer block and of each memory block kind, and a roofline time.

Every block is a list of `Part`s (attention projections, attention scores·values, SwiGLU,
sub-key scoring, top-k, value gathers, HIVE projections, ...), each with the cost of its
forward and of its backward. A `Cost` keeps the matmul FLOPs (what
`torch.utils.flop_counter.FlopCounterMode` counts and tensor cores run) apart from the other
operations (norms, top-k comparisons, gathers), which the counter cannot see.

Notation (all formulas below use it): B batch, T new tokens per sequence, C cached positions
before them, M = B·T token rows; d model width, H query heads of width e (H·e = d in a memory
block), G key/value heads, F SwiGLU hidden width; n sub-keys per half-key table, k slots read,
L HIVE latent width, Hp multi-head PKM query heads of width c (PKM: Hp = 1); P = #{(i, j):
(i+1)(j+1) ≤ k} the kit's exact candidate pairs (`sorted_pair_candidates`); s bytes per
activation / weight element, 8 per index (int64), 4 per retrieval weight (float32 softmax).
With p sub-spaces (``memory.n_subspaces``) the query splits into p parts of c/p, each scored
against n sub-keys (N = nᵖ), and P counts the tuples with ∏(i_j + 1) ≤ k (`candidate_tuples`).

Conventions:

* A matmul (m × q) · (q × p) costs 2·m·q·p FLOPs and moves (m·q + q·p + m·p)·s bytes: each
  operand read once and the result written once (an ideal cache, no fusion across ops).
* Backward of a matmul part = 2× its forward FLOPs and bytes: grad-input and grad-weight are one
  product of the forward's size each, each reading the output gradient and one forward operand
  and writing the other's gradient. Attention scores·values follow the same rule (dV, dP, dQ, dK:
  four products for the forward's two; FlopCounterMode's sdpa rule), without a flash kernel's
  recomputation of the scores. Elementwise parts (norms, rotary, SiLU, residual adds) also
  take 2× forward.
* Sub-key scoring is a dense matmul forward, but the kit's backward (`top_subkey_scores`) touches
  only the k kept scores per half: two weighted bags of k sub-key rows (grad query, grad sub-keys),
  4·k·c FLOPs per (token, head), none of them matmuls.
* Value gather backward = scatter-add of the k read rows into a dense, zero-filled gradient
  table (2·k·w FLOPs, the table's R·w·s bytes written once per step) plus the weights' gradient,
  k dot products of width w (2·k·w FLOPs).
* Top-k over x scores costs x·⌈log2 k⌉ comparisons (a heap's bound) and reads the scores once.
* Attention is a fused (flash) kernel: it reads Q, K, V once and writes O; the scores stay on
  chip and cost about 5 FLOPs each for the softmax. With ``attention_pairs="causal"`` a sequence
  has T·C + T(T+1)/2 query-key pairs (masked tiles skipped); ``"full"`` counts T·(C+T), what a
  dense kernel computes and what FlopCounterMode counts for the math backend.

`roofline_seconds` predicts time as Σ over parts (forward and backward apart) of
max(matmul FLOPs / matmul peak + other FLOPs / other peak, bytes / bandwidth): no kernel-launch
latency, no overlap between parts. Bytes assume that nothing stays in cache between ops and that
every gathered row comes from DRAM. A `Device` with ``cache_bytes`` refines that one point: the
rows gathered from (or scattered into) a table that fits in its cache are charged once for the
table at DRAM bandwidth and otherwise at ``cache_bandwidth`` (a HIVE bank of 65536 × 64 bf16
values is 8 MiB; per-head tables of a 32-head block are 32× that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

from midus.model.config import ModelConfig

INDEX_BYTES = 8
"""Slots and sub-key indices are int64."""
WEIGHT_BYTES = 4
"""Retrieval weights are a float32 softmax."""
BLOCK_KINDS = ("transformer", "hml-hive", "hml-per_head", "hml-shared", "pkm", "multihead_pkm")
"""``transformer`` = attention + SwiGLU FFN; the others are memory blocks (Attn' without W_O + branch)."""
BlockKind = Literal["transformer", "hml-hive", "hml-per_head", "hml-shared", "pkm", "multihead_pkm"]
AttentionPairs = Literal["causal", "full"]


@dataclass(frozen=True)
class Cost:
    """FLOPs (all), the matmul share of them, and bytes moved."""

    flops: float = 0.0
    matmul_flops: float = 0.0
    bytes: float = 0.0
    gathered_bytes: float = 0.0
    """The share of `bytes` that is rows gathered from or scattered into one table."""
    table_bytes: float = 0.0
    """Size of the tables those rows belong to (a cache that holds them serves the gathers)."""

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.matmul_flops + other.matmul_flops, self.bytes + other.bytes,
                    self.gathered_bytes + other.gathered_bytes, self.table_bytes + other.table_bytes)

    def scaled(self, factor: float) -> Cost:
        return Cost(self.flops * factor, self.matmul_flops * factor, self.bytes * factor,
                    self.gathered_bytes * factor, self.table_bytes)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else math.inf


@dataclass(frozen=True)
class Part:
    """One part of a block: its forward cost and the cost of its backward."""

    name: str
    forward: Cost
    backward: Cost


@dataclass(frozen=True)
class BlockSizes:
    """The sizes the formulas read, as in `ModelConfig` / `MemoryConfig` (resolved, no zeros)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    n_subkeys: int = 128
    topk: int = 32
    latent_dim: int = 64
    pkm_heads: int = 4
    pkm_query_dim: int = 0
    """0 means d_model, as in `MemoryConfig.pkm_query_dim`."""
    n_subspaces: int = 2
    """p query parts and sub-key tables per product-key space, as in `MemoryConfig.n_subspaces`."""

    @classmethod
    def from_config(cls, config: ModelConfig) -> BlockSizes:
        memory = config.memory
        return cls(
            config.d_model, config.n_heads, config.kv_heads, config.head_dim, config.ffn_width, memory.n_subkeys,
            memory.retrieved_topk, memory.latent_dim, memory.query_heads(config.n_heads),
            memory.query_dim(config.d_model), memory.n_subspaces,
        )

    @property
    def query_dim(self) -> int:
        return self.pkm_query_dim or self.d_model


@dataclass(frozen=True)
class Workload:
    """B sequences of T new tokens after C cached positions; `cache`: keys/values are written to a KV cache."""

    batch: int
    tokens: int
    context: int = 0
    cache: bool = False

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


@dataclass(frozen=True)
class Device:
    """Peak rates the roofline uses: matmul FLOP/s, other FLOP/s (vector units), DRAM bytes/s, and
    optionally a cache (bytes, bytes/s) that serves gathers from tables it holds (0: no cache)."""

    name: str
    matmul_flops: float
    other_flops: float
    bandwidth: float
    cache_bytes: float = 0.0
    cache_bandwidth: float = 0.0


H100_SXM = Device("H100 SXM, assumed: 989 TFLOP/s bf16 dense matmul, 67 TFLOP/s FP32 vector, 3.35 TB/s HBM3",
                  989e12, 67e12, 3.35e12)
H100_SXM_L2 = Device(H100_SXM.name + "; 50 MB L2 at 5.5 TB/s (assumed) serving gathers from tables that fit",
                     989e12, 67e12, 3.35e12, 50e6, 5.5e12)


def pair_candidates(k: int) -> int:
    """P = Σ_{i<k} ⌊k/(i+1)⌋: shortlist pairs (i, j) with (i+1)(j+1) ≤ k, about k·ln k (119 for k = 32)."""
    return sum(k // (i + 1) for i in range(k))


def candidate_tuples(k: int, parts: int = 2) -> int:
    """P: shortlist tuples (i_1, …, i_p) with ∏(i_j + 1) ≤ k (`pair_candidates` for p = 2)."""
    if parts == 1:
        return k
    return sum(candidate_tuples(k // (i + 1), parts - 1) for i in range(k))


def _matmul(batches: int, m: int, q: int, p: int, s: int) -> Cost:
    """`batches` products (m × q)·(q × p): 2·m·q·p FLOPs and (m·q + q·p + m·p)·s bytes each."""
    return Cost(2.0 * batches * m * q * p, 2.0 * batches * m * q * p, float(batches * (m * q + q * p + m * p) * s))


def _matmul_part(name: str, forward: Cost) -> Part:
    return Part(name, forward, forward.scaled(2.0))


def _elementwise(elements: int, flops_per_element: float, tensors_moved: int, s: int) -> Cost:
    """`elements` × flops_per_element FLOPs, reading/writing `tensors_moved` tensors of that size."""
    return Cost(elements * flops_per_element, 0.0, float(elements * tensors_moved * s))


def attention_parts(sizes: BlockSizes, work: Workload, s: int, output_projection: bool,
                    pairs: AttentionPairs) -> list[Part]:
    """Norm, rotary and residual; Q/K/V(/O) projections; fused scores·values.

    * projections: 2·M·d·H·e (Q) + 2·2·M·d·G·e (K, V) [+ 2·M·H·e·d (O, Transformer block only)]
    * scores·values: 4·B·H·pairs·e matmul FLOPs + 5·B·H·pairs softmax FLOPs; bytes
      (2·M·H·e + 2·B·(C+T)·G·e)·s for Q, O, K, V, plus 2·M·G·e·s written to the KV cache
    * elementwise: RMSNorm 4 FLOPs/element over M·d (read, write) per norm (2 in a Transformer
      block, 1 in a memory block), residual add 1 FLOP over M·d (read 2, write 1) per residual,
      rotary 3 FLOPs/element over M·(H+G)·e (read, write).
    """
    d, h, g, e, m = sizes.d_model, sizes.n_heads, sizes.n_kv_heads, sizes.head_dim, work.rows
    norms = 2 if output_projection else 1
    elementwise = (
        _elementwise(m * d, 4, 2, s).scaled(norms) + _elementwise(m * d, 1, 3, s).scaled(norms)
        + _elementwise(m * (h + g) * e, 3, 2, s)
    )
    projections = _matmul(1, m, d, h * e, s) + _matmul(2, m, d, g * e, s)
    if output_projection:
        projections += _matmul(1, m, h * e, d, s)
    t, c = work.tokens, work.context
    pair_count = t * c + t * (t + 1) // 2 if pairs == "causal" else t * (c + t)
    scores = 4.0 * work.batch * h * pair_count * e
    core_bytes = (2 * m * h * e + 2 * work.batch * (c + t) * g * e + (2 * m * g * e if work.cache else 0)) * s
    core = Cost(scores + 5.0 * work.batch * h * pair_count, scores, float(core_bytes))
    return [
        Part("norms, rotary, residual", elementwise, elementwise.scaled(2.0)),
        _matmul_part("attention projections", projections),
        Part("attention scores·values", core, core.scaled(2.0)),
    ]


def ffn_parts(sizes: BlockSizes, work: Workload, s: int) -> list[Part]:
    """SwiGLU: gate, up, down matmuls 3·2·M·d·F FLOPs; activation silu(g)·u ≈ 5 FLOPs over M·F (read 2, write 1)."""
    d, f, m = sizes.d_model, sizes.ffn_hidden, work.rows
    matmuls = _matmul(2, m, d, f, s) + _matmul(1, m, f, d, s)
    activation = _elementwise(m * f, 5, 3, s)
    return [_matmul_part("SwiGLU matmuls", matmuls), Part("SwiGLU activation", activation, activation.scaled(2.0))]


def retrieval_parts(sizes: BlockSizes, work: Workload, s: int, heads: int, width: int) -> list[Part]:
    """Product-key retrieval for `heads` queries of `width` c per token (per (token, head) unless noted).

    Written for p = 2 halves; with p sub-spaces (``n_subspaces``) read p for the 2 of "two halves",
    c/p for the half width and the p-tuples for the pairs:

    * query norm (RMSNorm on each half): 4 FLOPs/element over M·heads·c, read and write
    * sub-key scoring, two halves × n sub-keys: 2·n·c matmul FLOPs; bytes (c + 2n)·s, plus the
      sub-key tables heads·n·c·s once. Backward (sparse bags, no matmul): 4·k·c FLOPs, bytes
      (2k·s + 2k·8 + 3·k·c·s + 2c·s) plus the zero-filled sub-key gradient heads·n·c·s once
    * top-k over each half's n scores: 2·n·⌈log2 k⌉ comparisons; read 2n·s, write 2k·(s + 8).
      No backward of its own (the sparse sub-key backward consumes the kept scores' gradients)
    * candidates: P pair sums ((p − 1)·P additions), top-k over them (P·⌈log2 k⌉), slot ids and
      softmax (8k); bytes: read the shortlists 2k·(s + 8), write and read P scores 2P·s, write
      k·(4 + 8). Backward: softmax, top-k scatter and index_add, 2P + 4k FLOPs, (2P + 3k)·s bytes
    """
    m, n, k, parts = work.rows, sizes.n_subkeys, sizes.topk, sizes.n_subspaces
    rows = m * heads
    norm = _elementwise(rows * width, 4, 2, s)
    scoring = _matmul(parts * heads, m, width // parts, n, s)
    gathered = 3.0 * rows * k * width * s
    sparse_back = Cost(4.0 * rows * k * width, 0.0,
                       rows * (parts * k * s + parts * k * INDEX_BYTES + 2 * width * s) + gathered
                       + heads * n * width * s,
                       gathered, 2.0 * heads * n * width * s)  # the sub-keys and their gradient
    log_k = max(1, math.ceil(math.log2(k)))
    top = Cost(float(parts * rows * n * log_k), 0.0, float(rows * (parts * n * s + parts * k * (s + INDEX_BYTES))))
    p = candidate_tuples(k, parts)
    candidates = Cost(rows * ((parts - 1) * p + p * log_k + 8.0 * k), 0.0,
                      float(rows * (parts * k * (s + INDEX_BYTES) + 2 * p * s + k * (WEIGHT_BYTES + INDEX_BYTES))))
    candidates_back = Cost(rows * (parts * p + 4 * k), 0.0, float(rows * (2 * p + 3 * k) * s))
    return [
        Part("query norm", norm, norm.scaled(2.0)),
        Part("sub-key scoring", scoring, sparse_back),
        Part("sub-key top-k", top, Cost()),
        Part("candidate top-k, softmax", candidates, candidates_back),
    ]


def gather_part(bags: int, reads: int, width: int, table_rows: int, s: int) -> Part:
    """Weighted sums of `reads` rows of width w per bag from a table of R = `table_rows` rows.

    Forward: 2·reads·w FLOPs per bag; bytes per bag reads·w·s (rows) + reads·(4 + 8) (weights,
    slots) + w·s (output). Backward: 4·reads·w FLOPs per bag (scatter-add of the rows' gradients,
    weights' gradient); bytes per bag w·s + 3·reads·w·s (read rows, read-modify-write gradient
    rows) + reads·(2·4 + 8), plus the dense zero-filled table gradient R·w·s once.
    """
    rows_read, table = float(bags * reads * width * s), float(table_rows * width * s)
    forward = Cost(2.0 * bags * reads * width, 0.0,
                   bags * (reads * (WEIGHT_BYTES + INDEX_BYTES) + width * s) + rows_read, rows_read, table)
    backward = Cost(4.0 * bags * reads * width, 0.0,
                    bags * (width * s + reads * (2 * WEIGHT_BYTES + INDEX_BYTES)) + 3 * rows_read + table,
                    3 * rows_read, 2 * table)  # the table and its gradient
    return Part("value gather", forward, backward)


def block_parts(kind: BlockKind, sizes: BlockSizes, work: Workload, element_bytes: int = 2,
                attention_pairs: AttentionPairs = "causal") -> list[Part]:
    """Every part of one block of `kind` for `work`, at `element_bytes` per activation / weight element.

    Memory blocks add (per token unless noted; N = n², nᵖ with p sub-spaces):
    * hml-hive: retrieval with H heads of width e; gather of k latent rows (w = L, table N);
      HIVE projection per head 2·L·e matmul FLOPs (H batched (M × L)·(L × e) products)
    * hml-per_head: retrieval as above; gather of k rows of width e from the head's table (table H·N)
    * hml-shared: as per_head with one table of N rows
    * pkm / multihead_pkm: query projection 2·M·d·Hp·c matmul FLOPs; retrieval with Hp heads of
      width c; one bag per token of Hp·k rows of width d (table N)
    """
    s, m = element_bytes, work.rows
    h, e, d, slots = sizes.n_heads, sizes.head_dim, sizes.d_model, sizes.n_subkeys**sizes.n_subspaces
    parts = attention_parts(sizes, work, s, kind == "transformer", attention_pairs)
    if kind == "transformer":
        return parts + ffn_parts(sizes, work, s)
    if kind.startswith("hml"):
        parts += retrieval_parts(sizes, work, s, h, e)
        if kind == "hml-hive":
            parts.append(gather_part(m * h, sizes.topk, sizes.latent_dim, slots, s))
            parts.append(_matmul_part("HIVE head projection", _matmul(h, m, sizes.latent_dim, e, s)))
        else:
            parts.append(gather_part(m * h, sizes.topk, e, slots * (h if kind == "hml-per_head" else 1), s))
        return parts
    heads = 1 if kind == "pkm" else sizes.pkm_heads
    c = sizes.query_dim
    parts.append(_matmul_part("query projection", _matmul(1, m, d, heads * c, s)))
    parts += retrieval_parts(sizes, work, s, heads, c)
    parts.append(gather_part(m, heads * sizes.topk, d, slots, s))
    return parts


def step_costs(parts: Iterable[Part], backward: bool) -> list[tuple[str, Cost]]:
    """(part name, cost) of a forward (prefill, decode) or of a training step (forward + backward)."""
    return [(part.name, part.forward + part.backward if backward else part.forward) for part in parts]


def total(costs: Iterable[tuple[str, Cost]]) -> Cost:
    """The sum of the parts' costs."""
    result = Cost()
    for _, cost in costs:
        result += cost
    return result


def part_seconds(cost: Cost, device: Device) -> float:
    """max(matmul FLOPs / matmul peak + other FLOPs / other peak, DRAM bytes / bandwidth[, cache bytes / its rate]).

    Gathers from tables that fit in the device's cache move the table once from DRAM (at most
    what they gather) and the gathered rows from the cache.
    """
    compute = cost.matmul_flops / device.matmul_flops + (cost.flops - cost.matmul_flops) / device.other_flops
    dram, cached = cost.bytes, 0.0
    if cost.gathered_bytes and cost.table_bytes <= device.cache_bytes:
        dram = cost.bytes - cost.gathered_bytes + min(cost.table_bytes, cost.gathered_bytes)
        cached = cost.gathered_bytes
    return max(compute, dram / device.bandwidth, cached / device.cache_bandwidth if cached else 0.0)


def roofline_seconds(parts: Iterable[Part], device: Device, backward: bool) -> float:
    """Predicted time of a forward (or training step, `backward`): every part's roofline time, summed."""
    return sum(part_seconds(p.forward, device) + (part_seconds(p.backward, device) if backward else 0.0)
               for p in parts)
