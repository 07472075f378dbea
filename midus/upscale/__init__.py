"""Depth up-scaling surgery on kit models: DUS block copies and MIDUS memory blocks.

Plain PyTorch acting on models from outside; no file I/O of its own (a base is read by
`midus.checkpoint.load_base`) and never Lightning.
"""

from midus.upscale.config import UpscaleConfig
from midus.upscale.surgery import apply_trainable, insertion_points, upscale

__all__ = ["UpscaleConfig", "apply_trainable", "insertion_points", "upscale"]
