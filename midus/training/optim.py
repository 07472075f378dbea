"""Optimizer parameter groups and the learning-rate schedule.

Weight decay applies to weight matrices only: decaying norm gains, biases and embedding rows
pulls them towards zero for no benefit (the GPT-2/Llama recipe). One gain is the exception: a
product-key query norm's gain sets the scale of the retrieval scores, i.e. the softmax's inverse
temperature, and decay holds it back. The memory_health study measured with it decayed; without
decay, normalised queries and keys over-sharpened (experiments/README.md, "Memory health").
Memory values are rows that only a few tokens update at each step; like the PKM literature they
get their own group, with their own learning rate (``model.memory_optimizer.learning_rate``) and
no decay. Sub-keys are not decayed either (shrinking them only flattens the retrieval softmax)
and can join the memory group. Which parameters are value tables and sub-keys, each branch says
itself (`Branch.value_tables`, `Branch.subkey_tables`). Every group warms up linearly; then the
others decay on a cosine, and the memory group either does the same or, with
``model.memory_optimizer.schedule: constant``, stays at its peak (as Memory Layers at Scale
trains values at a fixed rate).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from midus.model.branches import Branch


def memory_roles(model: nn.Module) -> dict[int, str]:
    """``values`` or ``subkeys`` by parameter id, as the model's branches declare them."""
    roles: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, Branch):
            roles.update({id(parameter): "values" for parameter in module.value_tables()})
            roles.update({id(parameter): "subkeys" for parameter in module.subkey_tables()})
    return roles


def group_of(parameter_name: str, parameter: nn.Parameter, module: nn.Module, role: str | None,
             memory_keys: bool = False) -> str:
    """Optimizer group of a parameter: ``decay``, ``no_decay`` or ``memory``."""
    if role == "values" or (memory_keys and role == "subkeys"):
        return "memory"
    # QueryNorm is deliberately not a norm here: its (3-D) gain is the retrieval temperature and is
    # decayed like a weight matrix, its bias is not (see above).
    if role == "subkeys" or isinstance(module, (nn.Embedding, nn.RMSNorm, nn.LayerNorm)):
        return "no_decay"
    if parameter_name == "bias" or parameter.ndim < 2:
        return "no_decay"
    return "decay"


def parameter_groups(
    model: nn.Module, weight_decay: float, memory_lr: float | None = None, memory_keys: bool = False
) -> list[dict]:
    """AdamW groups of the trainable parameters; a tied matrix appears once (first owner wins).

    `memory_lr` sets the memory group's learning rate (None: the optimizer's default);
    `memory_keys` moves product-key sub-keys into that group.
    """
    roles = memory_roles(model)
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "memory": []}
    seen: set[int] = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            groups[group_of(name, parameter, module, roles.get(id(parameter)), memory_keys)].append(parameter)
    settings = {
        "decay": {"weight_decay": weight_decay},
        "no_decay": {"weight_decay": 0.0},
        "memory": {"weight_decay": 0.0},
    }
    if memory_lr is not None:
        settings["memory"]["lr"] = memory_lr
    return [{"name": name, "params": params, **settings[name]} for name, params in groups.items() if params]


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def fused_adamw_supported(groups: list[dict]) -> bool:
    """Whether AdamW's fused kernel takes every parameter: plain floating tensors on the CPU or CUDA.

    ``model.optimizer.fused`` uses it: one kernel per device for all tensors, where the default
    on CPU loops over them in Python. It computes the same update with other roundings, so the
    last bits of the weights differ from the default implementation's.
    """
    parameters = [parameter for group in groups for parameter in group["params"]]
    return bool(parameters) and all(
        type(parameter) in (torch.Tensor, nn.Parameter)  # not a DTensor or other subclass
        and parameter.dtype.is_floating_point
        and parameter.device.type in FUSED_ADAMW_DEVICES
        for parameter in parameters
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    memory_constant: bool = False,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's peak rate, then cosine decay to `min_lr_ratio` of it at
    `total_steps`; with `memory_constant` the ``memory`` group stays at its peak after the warmup."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1), min_lr_rate=min_lr_ratio
    )
    if memory_constant:
        # transformers' schedules put one multiplier on every group; LambdaLR takes one per group.
        # Both multipliers are equal at step 0, so the rates each constructor set stand.
        cosine = schedule.lr_lambdas[0]
        constant = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup).lr_lambdas[0]
        names = [group.get("name") for group in optimizer.param_groups]
        schedule.lr_lambdas = [constant if name == "memory" else cosine for name in names]
    return schedule
