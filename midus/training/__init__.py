"""The Lightning layer: the LightningModule (`CausalLM`), its callbacks and optimizer groups,
the run summary, and the LightningCLI subclass (`midus.training.cli`). What Lightning's public API
cannot do (private hooks and attributes) is reached in `midus.training.lightning_internals` alone.

With `midus.data.datamodule` (the LightningDataModule), the only part of the kit that imports
Lightning; it builds on the plain-PyTorch packages (`midus.model`, `midus.checkpoint`,
`midus.upscale`, `midus.data`) and never the other way round.
"""

from midus.training.lm_module import CausalLM

__all__ = ["CausalLM"]
