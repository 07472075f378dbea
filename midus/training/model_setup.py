"""The model as the training strategy needs it: compiled, and its blocks checkpointed, where asked.

`CausalLM.configure_model` calls `setup_model` once the strategy is known (Lightning's hook for it):

* ``model.compute.compile``: the whole model, or under FSDP each block, since Lightning's FSDPStrategy wraps the
  blocks after the hook and does not compile over its wrappers (torch.compile's docs advise per-unit
  compilation for FSDP; compiling the whole model breaks its graph at every unit's all-gather);
* ``model.compute.activation_checkpointing``: the model checkpoints its blocks itself on one device; under FSDP
  the strategy's ``activation_checkpointing_policy`` does it inside each unit, never both.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from midus.model import MidusLM
from midus.training.lightning_internals import fsdp_checkpoints_activations


def setup_model(model: MidusLM, strategy: Strategy | None, compile: bool, activation_checkpointing: bool,
                fitting: bool) -> None:
    """Compile `model` and hand its checkpointing to `strategy` as the module docstring says."""
    fsdp = isinstance(strategy, FSDPStrategy)
    if activation_checkpointing and fsdp:
        leave_checkpointing_to_fsdp(model, strategy, fitting)
    if not compile:
        return
    if not torch.are_deterministic_algorithms_enabled():
        rank_zero_warn(
            "model.compute.compile without PyTorch's deterministic mode: compiled kernels accumulate the "
            "embedding gradient with atomic adds, so the same seed gives a different curve in every "
            "run; set trainer.deterministic: warn (python -m midus sets it when it is unset)"
        )
    if fsdp:
        for block in model.blocks:
            block.compile()
    else:
        model.compile()


def leave_checkpointing_to_fsdp(model: MidusLM, strategy: FSDPStrategy, fitting: bool) -> None:
    """Under FSDP the strategy's ``activation_checkpointing_policy`` checkpoints the blocks (inside each
    FSDP unit, where FSDP expects the recomputation); the model never wraps them a second time. Without
    that policy a fit is refused: checkpointing outside the units is not what FSDP expects."""
    model.activation_checkpointing = False
    if fsdp_checkpoints_activations(strategy):
        rank_zero_info("model.compute.activation_checkpointing: FSDPStrategy's activation_checkpointing_policy "
                       "checkpoints the blocks; the model does not checkpoint them again")
    elif fitting:
        raise ValueError(
            "model.compute.activation_checkpointing=true under FSDPStrategy, whose activation_checkpointing_policy is "
            "not set: under FSDP the strategy checkpoints; set trainer.strategy.init_args."
            "activation_checkpointing_policy to the block classes (midus.model.block.TransformerBlock, "
            "midus.model.memory_block.MemoryBlock; experiments/gpu/fsdp.yaml does) and leave "
            "model.compute.activation_checkpointing false"
        )
