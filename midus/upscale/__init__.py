"""Depth up-scaling surgery on kit models: DUS block copies and MIDUS memory blocks.

A method (``model.upscale.method``) is a plan builder registered by name in `methods`, one file
each; `surgery.upscale` builds the deeper model its `plan.Plan` describes. Plain PyTorch acting on
models from outside; no file I/O of its own (a base is read by `midus.checkpoint.load_base`) and
never Lightning.
"""

from midus.upscale.config import UpscaleConfig
from midus.upscale.methods import method_names, register_upscale, registered_methods, upscale_method
from midus.upscale.plan import Plan, PlanEntry, insertion_points
from midus.upscale.surgery import apply_trainable, upscale

__all__ = [
    "Plan",
    "PlanEntry",
    "UpscaleConfig",
    "apply_trainable",
    "insertion_points",
    "method_names",
    "register_upscale",
    "registered_methods",
    "upscale",
    "upscale_method",
]
