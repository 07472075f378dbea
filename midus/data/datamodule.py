"""The LightningDataModule of the kit: `TextData` (the prepared text, loaders and recall probe)
as Lightning expects it, with its constructor arguments saved as hyperparameters."""

from __future__ import annotations

import lightning.pytorch as pl

from midus.data.text_data import EmbeddedCorpusConfig, TextData

__all__ = ["EmbeddedCorpusConfig", "LanguageModelingData"]


class LanguageModelingData(TextData, pl.LightningDataModule):
    """Packed causal-LM blocks from the embedded corpus, local files, or a Hugging Face dataset,
    for ``fit``/``validate``/``test``/``predict`` (every argument: `TextData`)."""

    def _keep_settings(self, settings: dict) -> None:
        # Saved in checkpoints (datamodule_hyper_parameters) and logged, as save_hyperparameters()
        # in the constructor would; given explicitly because the constructor is TextData's.
        self.save_hyperparameters(settings)
