"""``dus_top``: copies of the last blocks appended on top of the base.

    base    T0 T1 T2 T3                       top_blocks: 2
    deeper  T0 T1 T2 T3 T2' T3'               T' zeroed (zero_init_copies: true) or a plain copy

With zeroed copies (the default) the deeper model starts as the base's function.
"""

from __future__ import annotations

from midus.model.transformer import MidusLM
from midus.upscale.config import UpscaleConfig, register_upscale
from midus.upscale.plan import Plan


@register_upscale("dus_top", identity_at_insertion=True)
def top_plan(base: MidusLM, settings: UpscaleConfig) -> Plan:
    """The base, then a copy of each of its last `top_blocks` blocks."""
    n = base.config.depth
    if not 0 < settings.top_blocks <= n:
        raise ValueError(f"model.upscale.top_blocks={settings.top_blocks} must be in 1..{n} for a {n}-block base")
    kind = "zeroed" if settings.zero_init_copies else "copy"
    blocks = [("copy", i) for i in range(n)] + [(kind, i) for i in range(n - settings.top_blocks, n)]
    return Plan(blocks, inserted=list(range(n, len(blocks))))
