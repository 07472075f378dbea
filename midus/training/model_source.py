"""Which model a `CausalLM` trains: built from its config, a Hugging Face checkpoint, an up-scaled
base, or, when a checkpoint's weights are loaded into it, the architecture that checkpoint stores."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from midus.checkpoint import load_base, load_hf_checkpoint
from midus.checkpoint.kit import MODEL_CONFIG_KEY, stored_model_source
from midus.data.text_data import TextData
from midus.model import MidusLM, ModelConfig
from midus.upscale import UpscaleConfig, apply_trainable, upscale
from midus.upscale.head_allocation import importance_allocation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredModel:
    """A kit checkpoint's model as the file alone describes it (`midus.checkpoint.kit`): its
    architecture, the parameters its base build froze, and the size of that base."""

    path: str
    """The checkpoint, quoted in errors."""
    config: ModelConfig
    frozen_parameters: tuple[str, ...] = ()
    base_parameters: int = 0

    @classmethod
    def read(cls, checkpoint: dict, path: str) -> StoredModel | None:
        """The model of `checkpoint` (a `read_kit_checkpoint` result), or None when only its base
        can tell what the base build gave it (written before the kit stored that, with a base)."""
        source = stored_model_source(checkpoint)
        if source is None:
            return None
        try:
            config = ModelConfig(**checkpoint[MODEL_CONFIG_KEY])
        except (TypeError, ValueError) as error:
            raise ValueError(f"--ckpt_path: {path!r} holds an invalid model config ({error})") from None
        return cls(path, config, tuple(source["frozen_parameters"]), source["base_parameters"])


_stored_model: ContextVar[StoredModel | None] = ContextVar("midus_stored_model", default=None)


@contextmanager
def building_from_checkpoint(stored: StoredModel | None) -> Iterator[None]:
    """Inside it, `build_model` builds `stored`'s model instead of resolving ``model.config`` /
    ``model.pretrained`` / ``model.upscale``.

    `MidusCLI` builds the `CausalLM` inside it when ``--ckpt_path`` names a kit checkpoint: the
    Trainer loads the checkpoint's weights into the model right after, so loading the base and
    redoing the surgery is wasted work, and impossible once the base has moved. ``None``: no change.
    """
    token = _stored_model.set(stored)
    try:
        yield
    finally:
        _stored_model.reset(token)


@dataclass
class ModelSource:
    """The model to train and, when it was up-scaled, what the up-scaling added."""

    model: MidusLM
    base_parameters: int = 0
    """Parameters of the base before up-scaling (0 when there is no base)."""


def build_model(
    config: ModelConfig, pretrained: str, settings: UpscaleConfig, data: TextData | None = None
) -> ModelSource:
    """Resolve ``model.config`` / ``model.pretrained`` / ``model.upscale`` into the model to train
    (inside `building_from_checkpoint`: the checkpoint's model, after the same checks of the three).

    `data` is read only by ``model.upscale.memory_allocation: head_importance``, which scores the
    base's heads on its first training batches before the surgery.
    """
    if pretrained and settings.enabled:
        raise ValueError(
            "model.pretrained and model.upscale.base_checkpoint both name a starting model; "
            "put the Hugging Face directory in model.upscale.base_checkpoint"
        )
    if settings.enabled and not settings.base_checkpoint:
        raise ValueError(f"model.upscale.method={settings.method!r} needs model.upscale.base_checkpoint")
    stored = _stored_model.get()
    if stored is not None:
        return _stored(stored, config.vocab_size)
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
    if settings.memory_allocation == "head_importance":
        settings = _allocated_by_importance(base, settings, data)
    model, inserted = upscale(base, settings)
    apply_trainable(model, inserted, settings.trainable)
    log.info(
        "model.upscale: %s of %s: %d → %d blocks, %d → %d parameters (%d trainable); model.config is not used",
        settings.method, settings.base_checkpoint, base.config.depth, model.config.depth, base_parameters,
        model.num_parameters(), model.num_parameters(trainable_only=True),
    )
    return ModelSource(model, base_parameters)


def _allocated_by_importance(base: MidusLM, settings: UpscaleConfig, data: TextData | None) -> UpscaleConfig:
    """`settings` with ``memory.head_topk`` from the base's head importance on the first training batches."""
    if data is None:
        raise ValueError(
            "model.upscale.memory_allocation=head_importance scores the base on training batches, but the model "
            "was built without data (the CLI links it: model.allocation_data)"
        )
    device = base.embed.weight.device
    allocated, importance = importance_allocation(
        base, settings, _first_training_batches(data, settings.importance_batches, device)
    )
    log.info(
        "model.upscale.memory_allocation=head_importance (%s over the first %d training batches): memory.head_topk "
        "= %s; importance by base block: %s", settings.importance_score, settings.importance_batches,
        allocated.memory.head_topk,
        {index: [round(float(value), 6) for value in scores] for index, scores in importance.items()},
    )
    return allocated


def _first_training_batches(data: TextData, count: int, device: torch.device):
    """(inputs, targets) of the first `count` training batches in the stored order (no shuffle)."""
    loader = DataLoader(data.train_blocks, batch_size=data.settings["batch_size"])
    for index, batch in enumerate(loader):
        if index >= count:
            break
        ids = batch["input_ids"].to(device)
        yield ids[:, :-1], ids[:, 1:]


def _stored(stored: StoredModel, data_vocab: int) -> ModelSource:
    """The model of a checkpoint, untrained (its weights are loaded next), with the parameters its
    base build froze frozen again: a resumed run trains exactly the parameters it trained before."""
    model = MidusLM(stored.config)
    parameters = dict(model.named_parameters())
    unknown = sorted(set(stored.frozen_parameters) - set(parameters))
    if unknown:
        raise ValueError(
            f"--ckpt_path: {stored.path!r} lists frozen parameters its own architecture lacks ({unknown[:3]})"
        )
    for name in stored.frozen_parameters:
        parameters[name].requires_grad_(False)
    _check_vocab(model, data_vocab, f"--ckpt_path {stored.path!r}")
    log.info(
        "--ckpt_path: architecture from %s (%d blocks, %d parameters, %d trainable); model.config, "
        "model.pretrained and model.upscale are not read", stored.path, stored.config.depth,
        model.num_parameters(), model.num_parameters(trainable_only=True),
    )
    return ModelSource(model, stored.base_parameters)


def _check_vocab(model: MidusLM, data_vocab: int, what: str) -> None:
    if data_vocab > model.config.vocab_size:
        raise ValueError(
            f"{what} has {model.config.vocab_size} token embeddings but the data tokenizer has {data_vocab} "
            "tokens; train with the model's own tokenizer (data.tokenizer: auto takes the base's)"
        )
