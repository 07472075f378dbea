"""The LightningDataModule of the kit: `TextData` (the prepared text, loaders and recall probe)
as Lightning expects it, with its constructor arguments saved as hyperparameters."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from midus.data.sources import EmbeddedCorpusConfig, FilesConfig, HubConfig, ShardsConfig
from midus.data.text_data import TextData

__all__ = ["EmbeddedCorpusConfig", "FilesConfig", "HubConfig", "LanguageModelingData", "ShardsConfig"]


class LanguageModelingData(TextData, pl.LightningDataModule):
    """Packed causal-LM blocks from the embedded corpus, local files, or a Hugging Face dataset,
    for ``fit``/``validate``/``test``/``predict`` (every argument: `TextData`)."""

    def _keep_settings(self) -> None:
        # save_hyperparameters() of the constructor's own frame (TextData.__init__ calls this):
        # under LightningCLI it stores the parsed arguments as plain data (so a checkpoint loads
        # with weights_only=True), otherwise the constructor's arguments, exactly as if it had
        # been called in the constructor itself.
        self.save_hyperparameters(frame=inspect.currentframe().f_back)

    def train_dataloader(self) -> DataLoader:
        # overfit_batches makes Lightning rebuild the train loader around a SequentialSampler,
        # which a ResumableLoader cannot take; an overfitting check needs no resume.
        if self.trainer is not None and self.trainer.overfit_batches:
            return DataLoader(self.train_blocks, batch_size=self.settings["batch_size"])
        return super().train_dataloader()

    def processes(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
