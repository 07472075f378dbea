"""Keep freed CPU memory inside the process between training steps (glibc's malloc settings).

Every training step frees its activations and gradients and allocates them again in the next.
PyTorch's CPU allocator has no cache of its own (unlike its CUDA caching allocator): it asks
malloc each time. glibc serves blocks above its mmap threshold with fresh mappings and gives
the free top of its heap back to the kernel beyond the trim threshold, so the next step
touches new pages and the kernel faults each one in again (what that costs a small model's
step, and what these settings save: experiments/README.md, "Small-model speed").
`keep_freed_memory` raises the mmap threshold to glibc's own dynamic ceiling (32 MiB) and the
trim threshold to 1 GiB, so freed memory up to that is reused, as a caching allocator would.
The cost is resident memory: the process keeps up to that much freed heap.

``python -m midus`` applies it before a LightningCLI run; ``MIDUS_KEEP_FREED_MEMORY=0`` turns it
off. Elsewhere than glibc (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "MIDUS_KEEP_FREED_MEMORY"
"""Environment variable: ``0`` leaves glibc's malloc settings alone."""
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30
# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; True if glibc took them."""
    if os.environ.get(ENV, "").strip() == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; setting either value also stops glibc adjusting them itself.
    mapped = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return mapped and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
