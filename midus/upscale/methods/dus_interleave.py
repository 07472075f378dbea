"""``dus_interleave``: a zeroed copy of a block inserted right after it (LLaMA Pro, Wu et al., 2024).

    base    T0 T1 T2 T3                       every: 2 (or positions: [1, 3])
    deeper  T0 T1 T1' T2 T3 T3'               T' = T with attention output and FFN down projections zero

A zeroed copy adds nothing to the residual stream, so the deeper model starts as the base's
function and its copies train from there.
"""

from __future__ import annotations

from midus.model.transformer import MidusLM
from midus.upscale.config import UpscaleConfig, register_upscale
from midus.upscale.plan import Plan, added, insertion_points, interleaved


@register_upscale("dus_interleave", identity_at_insertion=True)
def interleave_plan(base: MidusLM, settings: UpscaleConfig) -> Plan:
    """A zeroed copy after every `every`-th base block, or after the blocks in `positions`."""
    n = base.config.depth
    blocks = interleaved(n, insertion_points(n, settings.every, settings.positions), "zeroed")
    return Plan(blocks, inserted=added(blocks))
