"""``model.upscale.memory_allocation: head_importance``: each inserted HML block's per-head k from the
importance of the base's attention heads, measured before the surgery.

    base         T0 T1 T2 T3            score s_ih of head h of block i (on training batches)
    deeper       T0 T1 M1 T2 T3 M3      M_i's head h is a copy of T_i's head h (attn_init: copy)
    allocation   k_h of M_i ∝ s_ih, each 1..n_subkeys, Σ_h k_h = n_heads · topk

The scores are those of `midus.analysis.head_importance` (ablation loss increase; gradient ×
activation after Michel et al., 2019), taken on the base's attention heads instead of memory
heads: a gate on each head's output a_h before W_O, hooked onto ``o_proj`` only while the
measurement runs. They live here rather than in `midus.analysis` because the up-scaling layer may
import only `midus.model` (docs/layout.md); the data arrive as plain batches.

Per-head k keeps both totals of the uniform allocation: the parameters (k sets no shape) and the
reads (Σ_h k_h = H·k), so the two allocations compare at equal memory parameters and reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from midus.model.transformer import MidusLM, next_token_loss
from midus.upscale.config import UpscaleConfig, upscale_method

SCORES = ("grad_x_act", "loss_increase")
"""Values of ``model.upscale.importance_score``."""


@contextmanager
def gated_attention_heads(model: MidusLM, blocks: list[int]) -> Iterator[dict[int, torch.Tensor | None]]:
    """A gate (n_heads,) on the attention heads' outputs of each block in `blocks`, before W_O.

    Yields the gates by block index, all None (ungated) at first; set ``gates[i] = gate`` to scale
    head h of block i by gate[h] from the next forward on. Gate 1 is exact (× 1).
    """
    gates: dict[int, torch.Tensor | None] = dict.fromkeys(blocks)
    handles = []
    for index in blocks:
        attn = model.blocks[index].attn
        handles.append(attn.o_proj.register_forward_pre_hook(_gate_hook(gates, index, attn.n_heads)))
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


def _gate_hook(gates: dict[int, torch.Tensor | None], index: int, n_heads: int):
    def gate_heads(module: nn.Module, inputs: tuple[torch.Tensor]):
        gate = gates[index]
        if gate is None:
            return None
        merged = inputs[0]  # (batch, time, H·d_h), head-major
        heads = merged.unflatten(-1, (n_heads, -1)) * gate.to(merged)[:, None]
        return (heads.flatten(-2),)

    return gate_heads


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
    for index in blocks:
        if model.blocks[index].attn.o_proj is None:
            raise ValueError(f"block {index} has no attention output projection to gate (a memory block)")
    n_heads = model.config.n_heads
    totals = {index: torch.zeros(n_heads, dtype=torch.float64) for index in blocks}
    baseline, tokens = 0.0, 0
    requires_grad = [parameter.requires_grad for parameter in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    try:
        with gated_attention_heads(model, blocks) as gates:
            for inputs, targets in batches:
                ones = torch.ones(n_heads, device=inputs.device)
                if score == "grad_x_act":
                    for index in blocks:
                        gates[index] = ones.clone().requires_grad_(True)
                    loss = next_token_loss(model(inputs), targets, reduction="sum")
                    gradients = torch.autograd.grad(loss, [gates[index] for index in blocks])
                    for index, gradient in zip(blocks, gradients):
                        totals[index] += gradient.abs().double().cpu()
                else:
                    with torch.no_grad():
                        baseline += float(next_token_loss(model(inputs), targets, reduction="sum"))
                        for index in blocks:
                            for head in range(n_heads):
                                gate = ones.clone()
                                gate[head] = 0.0
                                gates[index] = gate
                                totals[index][head] += float(next_token_loss(model(inputs), targets, reduction="sum"))
                            gates[index] = None
                tokens += targets.numel()
    finally:
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
    if tokens == 0:
        raise ValueError("model.upscale.memory_allocation=head_importance: the training split gave no batches")
    if score == "grad_x_act":
        return {index: total / tokens for index, total in totals.items()}
    return {index: (total - baseline) / tokens for index, total in totals.items()}


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
