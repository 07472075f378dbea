"""The kit's model, in plain PyTorch (never imports Lightning or any other kit package).

`config` (with `memory_config`) describes a model layer by layer; `transformer` builds it
from Transformer blocks (`block`) and MIDUS memory blocks (`memory_block`) with shared
`attention`, `rotary` embeddings and a `kv_cache`. Residual branches live in `branches/`
(one file each, chosen by name), product-key retrieval and value lookup in `retrieval/`;
`block_labels` names modules by the block they sit in (the labels of per-layer metrics).
"""

from midus.model.config import LayerSpec, ModelConfig
from midus.model.kv_cache import KVCache
from midus.model.memory_config import MemoryConfig
from midus.model.transformer import MidusLM

__all__ = ["KVCache", "LayerSpec", "MemoryConfig", "MidusLM", "ModelConfig"]
