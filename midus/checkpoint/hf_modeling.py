"""The kit's `MidusLM` as a transformers model: the classes of an exported custom-code directory.

`midus.checkpoint.hf_custom_code` copies this file, as ``modeling_midus.py``, together with the
kit's model package (``midus/model``, flattened into ``midus_model*.py`` files with relative
imports) into the export directory, and names these classes in ``config.json``'s ``auto_map``.
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` then builds the kit's own
modules, with no kit installed: the exported model is the kit model, not a re-implementation.

The wrapper has no KV cache of transformers' kind: every forward (including each step of
`generate`) reads the whole sequence, which gives the same greedy tokens as the kit's cached
decoding at a higher cost per token. Padding: right padding (what lm-evaluation-harness's
log-likelihood batches use) is fine for a causal model; left padding is refused, since the
kit's positions start at 0 for every row.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from midus.model.config import ModelConfig
from midus.model.transformer import MidusLM


class MidusHFConfig(PretrainedConfig):
    """A kit `ModelConfig` (as plain data, ``midus_config``) inside a transformers config."""

    model_type = "midus"

    def __init__(self, midus_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.midus_config = dict(midus_config or {})
        kwargs.setdefault("tie_word_embeddings", bool(self.midus_config.get("tie_embeddings", False)))
        # The standard names transformers' generation and tools read; the kit's own are in midus_config.
        for standard, kit in (("vocab_size", "vocab_size"), ("hidden_size", "d_model"),
                              ("num_hidden_layers", "n_layers"), ("num_attention_heads", "n_heads")):
            if kit in self.midus_config:
                kwargs.setdefault(standard, self.midus_config[kit])
        kwargs.setdefault("use_cache", False)  # the wrapper keeps no cache (module docstring)
        super().__init__(**kwargs)


class MidusForCausalLM(PreTrainedModel, GenerationMixin):
    """`MidusLM` behind transformers' causal-LM interface (``logits``, ``loss``, `generate`)."""

    config_class = MidusHFConfig
    base_model_prefix = "model"
    # Applied only when config.tie_word_embeddings is true (transformers checks it).
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _supports_cache_class = False

    def __init__(self, config: MidusHFConfig) -> None:
        super().__init__(config)
        self.model = MidusLM(ModelConfig(**config.midus_config))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # MidusLM initialises itself; from_pretrained then loads every weight

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> MidusForCausalLM:
        """transformers' `from_pretrained`, then the kit's derived buffers rebuilt (see `restore_buffers`)."""
        model = super().from_pretrained(*args, **kwargs)
        model.restore_buffers()
        return model

    @torch.no_grad()
    def restore_buffers(self) -> None:
        """Recompute the buffers the kit derives from its config (rotary frequencies, product-key
        pair indices): they are not in the weights file, and transformers builds the model on the
        meta device before loading, which leaves them empty."""
        with torch.device("cpu"):
            fresh = MidusLM(ModelConfig(**self.config.midus_config))
        persistent = set(fresh.state_dict())
        for name, buffer in fresh.named_buffers():
            if name not in persistent:
                module_name, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(module_name) if module_name else self.model
                device = next(self.model.parameters()).device
                module.register_buffer(leaf, buffer.to(device), persistent=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of the kit model (and the shifted next-token loss when `labels` are given)."""
        if attention_mask is not None and attention_mask.shape[1] > 1:
            # A row padded on the left has a 0 before a 1: its positions would be shifted.
            if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
                raise ValueError("left padding is not supported by the kit model; pad on the right")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        # No cache: each step reads the whole sequence so far.
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}
