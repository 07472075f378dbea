"""What a validation measures besides ``val/loss`` (plain PyTorch, no Lightning).

`ValidationProbes` runs them, configured by `ProbeConfig` (``model.probes``): the recall probe
(`recall`), knowledge bits (`knowledge_bits`), the memory-zeroed loss and recall (`memory_zeroed`)
and slot usage (`midus.model.retrieval.slot_usage`). `Processes` is how they split work over the
processes of a run and sum what they counted.
"""

from midus.probes.processes import Processes
from midus.probes.validation import ProbeConfig, ValidationProbes

__all__ = ["ProbeConfig", "Processes", "ValidationProbes"]
