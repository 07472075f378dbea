"""The kit's decoder: embedding → blocks (one per `ModelConfig.stack` entry) → norm → head.

    ids ─ embed ─┬─ block 0 ─ block 1 ─ … ─ block L-1 ─ norm ─ lm_head ─ logits
                 └─ rotary (cos, sin) for the absolute positions, shared by all blocks

Two training-memory switches change what is kept for the backward, not what is computed:
`MidusLM.activation_checkpointing` recomputes each block in the backward, and ``forward(...,
targets=..., loss_chunk_tokens=c)`` returns the loss without full-vocabulary logits
(`midus.model.chunked_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from midus.model.block import TransformerBlock
from midus.model.branches.registry import Branch
from midus.model.chunked_loss import chunked_next_token_loss
from midus.model.config import ModelConfig
from midus.model.kv_cache import KVCache
from midus.model.memory_block import MemoryBlock
from midus.model.rotary import RotaryEmbedding

BLOCK_CLASSES: dict[str, type[nn.Module]] = {"transformer": TransformerBlock, "memory": MemoryBlock}


class MidusLM(nn.Module):
    """A Llama-style causal language model built from a `ModelConfig`.

    Attributes:
        activation_checkpointing: keep only each block's input during a training forward and
            recompute the block in the backward (``torch.utils.checkpoint``, non-reentrant, one
            block at a time, as litgpt and torchtitan checkpoint per block). Applies only in
            training mode with gradients enabled and without a KV cache, so evaluation, probes and
            generation run as usual. A training setting, not architecture: not in `ModelConfig`.
            Off by default; `midus.training.CausalLM` sets it from ``model.compute.activation_checkpointing``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.require_vocab()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            BLOCK_CLASSES[spec.block](config, index) for index, spec in enumerate(config.stack)
        )
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        targets: torch.Tensor | None = None,
        loss_chunk_tokens: int = 0,
    ) -> torch.Tensor:
        """input_ids: (batch, time) at absolute positions start.. → logits (batch, time, vocab).

        With `targets` (batch, time) it returns their mean next-token loss (float32) instead:
        with ``loss_chunk_tokens > 0`` computed in chunks of that many tokens without building
        full-vocabulary logits (`midus.model.chunked_loss`), with 0 from the full logits
        (`next_token_loss`). Through ``forward`` so that a compiled model compiles the loss too.
        """
        if targets is None:
            return self.lm_head(self.hidden_states(input_ids, cache, start))
        hidden = self.hidden_states(input_ids, cache, start)
        if loss_chunk_tokens:
            return chunked_next_token_loss(hidden, self.lm_head.weight, targets, loss_chunk_tokens)
        return next_token_loss(self.lm_head(hidden), targets)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-norm hidden states (batch, time, d_model), before the output head."""
        x = self.embed(input_ids)
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        rope = self.rotary(positions, x.dtype)
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                # Saves only x (and the shared rope) for the backward; the block runs again there, under
                # the autocast state and RNG state of this forward (torch.utils.checkpoint restores both).
                x = checkpoint(block, x, rope, None, start, use_reentrant=False)
            else:
                x = block(x, rope, cache, start)
        return self.norm(x)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache sized for `max_len` positions, on this model's device and dtype."""
        weight = self.embed.weight
        return KVCache(
            len(self.blocks), batch_size, max_len, self.config.kv_heads, self.config.head_dim,
            weight.device, weight.dtype,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue (batch, time) prompts with a KV cache; temperature 0 means greedy.

        Returns (batch, time + new) ids. Sequences that emitted `eos_token_id` keep emitting
        it, so the batch stays rectangular; generation stops early once all have.
        """
        batch, prompt_len = input_ids.shape
        cache = self.new_cache(batch, prompt_len + max_new_tokens)
        logits = self(input_ids, cache, 0)[:, -1]
        out = input_ids
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_ids = _pick_next(logits, temperature, top_k, generator)
            if eos_token_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_token_id), next_ids)
                finished |= next_ids == eos_token_id
            out = torch.cat((out, next_ids[:, None]), dim=1)
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            logits = self(next_ids[:, None], cache, prompt_len + step)[:, -1]
        return out

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count, counting tied matrices once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def num_memory_parameters(self) -> int:
        """Parameters of product-key memory branches: sub-keys, values, query and value projections."""
        memories = [module for module in self.modules() if isinstance(module, Branch) and module.is_product_key_memory]
        return sum(p.numel() for module in memories for p in module.parameters())


def _pick_next(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    # logits: (batch, vocab) -> (batch,)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of logits (batch, time, vocab) against next tokens (batch, time), in float32
    (bf16 logits would round the loss); the one loss training, validation and analyses share."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
