"""Plain-PyTorch model code (never imports Lightning)."""

from midus.model.config import LayerSpec, ModelConfig
from midus.model.memory_config import MemoryConfig
from midus.model.kv_cache import KVCache
from midus.model.transformer import MidusLM

__all__ = ["KVCache", "LayerSpec", "MemoryConfig", "MidusLM", "ModelConfig"]
