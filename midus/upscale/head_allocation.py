"""``model.upscale.memory_allocation: head_importance``: each inserted HML block's per-head k from the
importance of the base's attention heads, measured before the surgery.

    base         T0 T1 T2 T3            score s_ih of head h of block i (on training batches)
    deeper       T0 T1 M1 T2 T3 M3      M_i's head h is a copy of T_i's head h (attn_init: copy)
    allocation   k_h of M_i ∝ s_ih, each 1..n_subkeys, Σ_h k_h = n_heads · topk

The scores are those of `python -m midus head-importance` (ablation loss increase; gradient ×
activation after Michel et al., 2019), taken by `midus.model.head_gates` on the base's attention
heads instead of memory heads: a gate on each head's output a_h before W_O, hooked onto ``o_proj``
only while the measurement runs. The data arrive as plain batches.

Per-head k keeps both totals of the uniform allocation: the parameters (k sets no shape) and the
reads (Σ_h k_h = H·k), so the two allocations compare at equal memory parameters and reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from midus.model.head_gates import gated_attention_heads, gated_head_losses
from midus.model.transformer import MidusLM
from midus.upscale.config import UpscaleConfig, upscale_method

SCORES = ("grad_x_act", "loss_increase")
"""Values of ``model.upscale.importance_score``."""


def attention_head_importance(
    model: MidusLM, blocks: list[int], batches: Iterable[tuple[torch.Tensor, torch.Tensor]], score: str
) -> dict[int, torch.Tensor]:
    """Importance (n_heads,) float64, nats per token, of every attention head of each block in `blocks`.

    ``grad_x_act``: Σ_batches |d summed loss / d gate_h| at gate 1, over the tokens; ``loss_increase``:
    mean loss with head h's output removed minus the mean loss with every head, over the same
    batches. Parameters get no gradients and are left as they were.
    """
    if score not in SCORES:
        raise ValueError(f"model.upscale.importance_score={score!r}; expected one of {', '.join(SCORES)}")
    with gated_attention_heads(model, blocks) as gates:
        sums = gated_head_losses(
            model, gates, dict.fromkeys(blocks, model.config.n_heads), batches,
            ablation=score == "loss_increase", gradients=score == "grad_x_act",
        )
    if sums.tokens == 0:
        raise ValueError("model.upscale.memory_allocation=head_importance: the training split gave no batches")
    if score == "grad_x_act":
        return {index: total / sums.tokens for index, total in sums.grad_x_act.items()}
    return {index: (total - sums.baseline) / sums.tokens for index, total in sums.ablated.items()}


def allocate_topk(importance: torch.Tensor, topk: int, n_subkeys: int) -> list[int]:
    """Per-head k proportional to `importance` (negative counts as 0), each in 1..n_subkeys, summing to
    len(importance) · topk.

    The real-valued shares x_h = clip(c · s_h, 1, n_subkeys) with c chosen so Σ x_h = H · topk (found
    by bisection; heads of importance 0 share what the others cannot take), then rounded by largest
    remainder, so a more important head never gets fewer slots than a less important one. All heads
    equally important (or all 0): every head gets `topk`.
    """
    scores = importance.double().clamp_min(0.0)
    n_heads = scores.numel()
    total = n_heads * topk
    if not 1 <= topk <= n_subkeys:
        raise ValueError(f"memory.topk={topk} must be between 1 and memory.n_subkeys={n_subkeys}")
    if scores.max() <= 0 or torch.all(scores == scores[0]):
        return [topk] * n_heads
    low, high = 0.0, 1.0
    while torch.clamp(high * scores, 1.0, n_subkeys).sum() < total and high < 1e300:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2
        if torch.clamp(middle * scores, 1.0, n_subkeys).sum() < total:
            low = middle
        else:
            high = middle
    shares = torch.clamp(high * scores, 1.0, n_subkeys)
    zero = scores == 0
    if shares.sum() < total and zero.any():  # the positive heads are full: the rest goes to the others
        shares[zero] += (total - shares.sum()) / zero.sum()
    floors = shares.floor().clamp(1, n_subkeys)
    ks = [int(value) for value in floors]
    remainder = total - sum(ks)
    # Largest fractional part first; ties by importance, then by head index (deterministic).
    order = sorted(range(n_heads), key=lambda h: (-(shares[h] - floors[h]).item(), -scores[h].item(), h))
    step = 1 if remainder > 0 else -1
    while remainder:
        moved = False
        for head in order if step > 0 else reversed(order):
            if remainder and 1 <= ks[head] + step <= n_subkeys:
                ks[head] += step
                remainder -= step
                moved = True
        if not moved:
            raise ValueError(f"cannot allocate {total} reads over {n_heads} heads of 1..{n_subkeys} each")
    return ks


def importance_allocation(
    base: MidusLM, settings: UpscaleConfig, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[UpscaleConfig, dict[int, torch.Tensor]]:
    """`settings` with ``memory.head_topk`` from the importance of the base's heads on `batches`, and
    that importance by base block: row r of ``head_topk`` is the r-th memory block's, from the
    heads of the base block it follows (and copies its attention from)."""
    field = "model.upscale.memory_allocation=head_importance"
    if settings.method != "midus" or settings.branch != "hml":
        raise ValueError(
            f"{field} allocates HML's per-head reads; it needs model.upscale.method: midus and branch: hml "
            f"(got method={settings.method!r}, branch={settings.branch!r})"
        )
    if settings.attn_init != "copy":
        raise ValueError(
            f"{field} maps each memory head to the base head it copies; it needs model.upscale.attn_init: copy "
            f"(got {settings.attn_init!r})"
        )
    if settings.memory.head_topk:
        raise ValueError(
            f"{field} computes model.upscale.memory.head_topk; leave memory.head_topk empty, or set "
            "memory_allocation: uniform to keep the rows given"
        )
    if any(spec.block == "memory" for spec in base.config.stack):
        raise ValueError(f"{field} needs a base without memory blocks; this base has some already")
    plan = upscale_method(settings.method).build_plan(base, settings)
    plan_sources = [source for kind, source in plan.blocks if kind == "memory"]
    memory = settings.memory
    blocks = sorted(set(plan_sources))
    importance = attention_head_importance(base, blocks, batches, settings.importance_score)
    rows = [allocate_topk(importance[source], memory.topk, memory.n_subkeys) for source in plan_sources]
    allocated = dataclasses.replace(settings, memory=dataclasses.replace(memory, head_topk=rows))
    return allocated, importance
