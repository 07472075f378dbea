"""The Lightning layer: the only part of the kit that imports Lightning."""

from midus.training.data_module import EmbeddedCorpusConfig, LanguageModelingData
from midus.training.lm_module import CausalLM

__all__ = ["CausalLM", "EmbeddedCorpusConfig", "LanguageModelingData"]
