"""``dus_solar``: SOLAR's depth up-scaling (Kim et al., 2023), two copies stacked at a seam.

    base    0 1 … n-1
    first   0 1 … n-1-m          (the last m blocks dropped)
    second        m … n-1        (the first m blocks dropped; these n-m blocks count as inserted)

32 blocks with m = 8 give 48. Not an identity: the second copy reads what the first wrote.
"""

from __future__ import annotations

from midus.model.transformer import MidusLM
from midus.upscale.config import UpscaleConfig, register_upscale
from midus.upscale.plan import Plan


@register_upscale("dus_solar", identity_at_insertion=False)
def solar_plan(base: MidusLM, settings: UpscaleConfig) -> Plan:
    """Two copies of the base, `settings.drop` blocks dropped from each at the seam."""
    n = base.config.depth
    if not 0 <= settings.drop < n:
        raise ValueError(f"model.upscale.drop={settings.drop} must be in 0..{n - 1} for a {n}-block base")
    # First copy without its last m blocks, second copy without its first m.
    blocks = [("copy", i) for i in range(n - settings.drop)] + [("copy", i) for i in range(settings.drop, n)]
    return Plan(blocks, inserted=list(range(n - settings.drop, len(blocks))))
