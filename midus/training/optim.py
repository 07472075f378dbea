"""Optimizer parameter groups and the learning-rate schedule.

Weight decay applies to weight matrices only: decaying norm gains, biases and embedding
rows pulls them towards zero for no benefit (the GPT-2/Llama recipe). Parameters are sorted
into named groups so later branch types can get their own group (e.g. memory values with
their own learning rate) by extending `group_of`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def group_of(module: nn.Module, parameter_name: str, parameter: nn.Parameter) -> str:
    """Name of the optimizer group a parameter belongs to: ``decay`` or ``no_decay``."""
    if isinstance(module, (nn.Embedding, nn.RMSNorm, nn.LayerNorm)) or parameter_name == "bias" or parameter.ndim < 2:
        return "no_decay"
    return "decay"


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters; a tied matrix appears once (first owner wins)."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": []}
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            groups[group_of(module, name, parameter)].append(parameter)
    decay = {"decay": weight_decay, "no_decay": 0.0}
    return [
        {"name": name, "params": params, "weight_decay": decay[name]} for name, params in groups.items() if params
    ]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak rate, then cosine decay to `min_lr_ratio` of it at `total_steps`."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=min(warmup_steps, max(total_steps - 1, 0)),
        num_training_steps=max(total_steps, 1),
        min_lr_rate=min_lr_ratio,
    )
