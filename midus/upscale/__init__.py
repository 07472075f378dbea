"""Depth up-scaling of trained kit models: DUS block copies and MIDUS memory blocks (no Lightning)."""

from midus.upscale.config import UpscaleConfig
from midus.upscale.sources import load_base, load_kit_checkpoint
from midus.upscale.surgery import apply_trainable, insertion_points, upscale

__all__ = ["UpscaleConfig", "apply_trainable", "insertion_points", "load_base", "load_kit_checkpoint", "upscale"]
