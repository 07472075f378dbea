"""The Llama feed-forward branch: SwiGLU, down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from midus.model.branches.registry import Branch, register_branch
from midus.model.config import ModelConfig


@register_branch("ffn")
class SwiGLUFeedForward(Branch):
    """Dense SwiGLU FFN with hidden width ``config.ffn_width`` and no biases."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_width, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_width, bias=False)
        self.down_proj = nn.Linear(config.ffn_width, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, time, d_model) -> (batch, time, d_model)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
