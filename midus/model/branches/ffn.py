"""The Llama feed-forward branch: SwiGLU, down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from midus.model.branches.registry import Branch, register_branch
from midus.model.config import ModelConfig


@register_branch("ffn")
class SwiGLUFeedForward(Branch):
    """Dense SwiGLU FFN with hidden width ``config.ffn_width`` and no biases.

    Its input is ``config.branch_input_width(layer_index)`` wide: d_model, or in a memory block
    on decoupled heads the heads a_1 … a_H (n_heads · head_dim); its output is d_model.
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        in_width = config.branch_input_width(layer_index)
        self.gate_proj = nn.Linear(in_width, config.ffn_width, bias=False)
        self.up_proj = nn.Linear(in_width, config.ffn_width, bias=False)
        self.down_proj = nn.Linear(config.ffn_width, config.d_model, bias=False)

    @classmethod
    def decoupled_heads_error(cls, memory: object) -> str | None:
        return None  # gate_proj and up_proj read whatever width the block gives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, time, branch_input_width) -> (batch, time, d_model)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
