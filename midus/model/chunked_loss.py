"""Next-token cross entropy over hidden states and the output head, without full-vocabulary logits.

The plain loss builds logits (tokens, vocab) for the whole batch, upcasts them to float32 and
keeps the log-softmax for the backward: about 4 + 4 + 2 bytes per token and vocabulary entry at
its peak under bf16 autocast (bf16 logits, float32 copy, float32 log-softmax), more in the
backward. For a 128k vocabulary that is the largest tensor of a training step.

Here the flattened tokens are cut into chunks of `chunk_tokens` rows:

    hidden (N, d) ─ rows 0..c-1 ─ head ─ logits (c, V) ─ float32 ─ CE sum ─┐
                  ─ rows c..2c-1 ─ …                                       ├─ Σ / (tokens not ignored)
                  ─ last, partial chunk ─ …                               ─┘

Each chunk runs under `torch.utils.checkpoint` (non-reentrant), so the forward keeps only the
chunk's input rows (views of `hidden`) and drops its logits as soon as its loss sum exists; the
backward recomputes one chunk's logits at a time. The price is one more head matmul per token.
(litgpt's ``chunked_cross_entropy`` chunks logits that already exist; OLMo-core and Liger fuse
the head and the loss in a kernel that computes the gradients in the forward; this module keeps
eager PyTorch ops and recomputes instead, so autocast, ``torch.compile`` and tied weights behave
as in the plain loss.)

The loss equals ``F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)`` of the
full logits up to the order of the float32 summation, and so do its gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
"""Targets with this value add nothing to the loss and are not counted (``F.cross_entropy``'s default)."""


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    # The head as `nn.Linear` computes it (no bias: the kit's head has none), then the loss in
    # float32 as `next_token_loss` does (bf16 logits would round the loss).
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


def chunked_next_token_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean next-token cross entropy of ``hidden @ head_weightᵀ`` against `targets`, in float32.

    Args:
        hidden: final hidden states (..., d_model), e.g. (batch, time, d_model) after the final norm.
        head_weight: the output head's weight (vocab, d_model); the embedding matrix when tied.
        targets: token ids of shape ``hidden.shape[:-1]``; `ignore_index` marks positions to skip.
        chunk_tokens: rows of the flattened (tokens, d_model) hidden states per chunk (> 0); the
            last chunk holds what is left.
        ignore_index: target value that is neither scored nor counted.

    Returns:
        The mean over the counted tokens (NaN when every target is ignored, as ``F.cross_entropy``).

    Raises:
        ValueError: `chunk_tokens` is not positive, or `targets` does not match `hidden`.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"loss_chunk_tokens must be positive to chunk the loss, got {chunk_tokens}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden states {tuple(hidden.shape)}")
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    # Recompute only where a backward will run; under no_grad (validation) a chunk is computed once anyway.
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    total = None
    for start in range(0, rows.shape[0], chunk_tokens):
        chunk, chunk_targets = rows[start : start + chunk_tokens], flat_targets[start : start + chunk_tokens]
        if recompute:
            part = checkpoint(_chunk_loss_sum, chunk, head_weight, chunk_targets, ignore_index, use_reentrant=False)
        else:
            part = _chunk_loss_sum(chunk, head_weight, chunk_targets, ignore_index)
        total = part if total is None else total + part
    if total is None:  # no tokens at all: the mean of nothing, as F.cross_entropy gives it
        return rows.new_full((), float("nan"), dtype=torch.float32)
    return total / (flat_targets != ignore_index).sum()
