"""Which model a `CausalLM` trains: built from its config, a Hugging Face checkpoint, or an up-scaled base."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from midus.checkpoint import load_base, load_hf_checkpoint
from midus.model import MidusLM, ModelConfig
from midus.upscale import UpscaleConfig, apply_trainable, upscale

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """The model to train and, when it was up-scaled, what the up-scaling added."""

    model: MidusLM
    base_parameters: int = 0
    """Parameters of the base before up-scaling (0 when there is no base)."""


def build_model(config: ModelConfig, pretrained: str, settings: UpscaleConfig) -> ModelSource:
    """Resolve ``model.config`` / ``model.pretrained`` / ``model.upscale`` into the model to train."""
    if pretrained and settings.enabled:
        raise ValueError(
            "model.pretrained and model.upscale.base_checkpoint both name a starting model; "
            "put the Hugging Face directory in model.upscale.base_checkpoint"
        )
    if settings.enabled and not settings.base_checkpoint:
        raise ValueError(f"model.upscale.method={settings.method!r} needs model.upscale.base_checkpoint")
    if pretrained:
        source = ModelSource(load_hf_checkpoint(pretrained)[0])
        _check_vocab(source.model, config.vocab_size, f"model.pretrained={pretrained!r}")
        log.info("model.pretrained: architecture and weights from %s (model.config is not used)", pretrained)
        return source
    if not settings.enabled:
        return ModelSource(MidusLM(config))
    base = load_base(settings.base_checkpoint, settings.base_made_by)
    _check_vocab(base, config.vocab_size, f"model.upscale.base_checkpoint={settings.base_checkpoint!r}")
    base_parameters = base.num_parameters()
    model, inserted = upscale(base, settings)
    apply_trainable(model, inserted, settings.trainable)
    log.info(
        "model.upscale: %s of %s: %d → %d blocks, %d → %d parameters (%d trainable); model.config is not used",
        settings.method, settings.base_checkpoint, base.config.depth, model.config.depth, base_parameters,
        model.num_parameters(), model.num_parameters(trainable_only=True),
    )
    return ModelSource(model, base_parameters)


def _check_vocab(model: MidusLM, data_vocab: int, what: str) -> None:
    if data_vocab > model.config.vocab_size:
        raise ValueError(
            f"{what} has {model.config.vocab_size} token embeddings but the data tokenizer has {data_vocab} "
            "tokens; train with the base's tokenizer (data.tokenizer: hf, data.tokenizer_path: its directory)"
        )
