"""Up-scaling methods, one file each, selectable by name as ``model.upscale.method``.

The registry and the decorator live with the settings they serve, in `midus.upscale.config`.
"""

from midus.upscale.config import (
    NO_UPSCALING,
    UpscaleMethod,
    check_method_name,
    method_names,
    register_upscale,
    registered_methods,
    upscale_method,
)

# One import per method file: importing it registers the method (in this order, which is the
# order `method_names` lists them in).
from midus.upscale.methods import dus_solar, dus_interleave, dus_top, midus  # noqa: E402,F401  isort: skip

__all__ = [
    "NO_UPSCALING",
    "UpscaleMethod",
    "check_method_name",
    "method_names",
    "register_upscale",
    "registered_methods",
    "upscale_method",
]
