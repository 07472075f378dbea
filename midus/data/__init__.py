"""Everything about text: the embedded biography corpus (`corpus`) and its recall probe
(`recall_probe`), data sources (`sources`: embedded, local files, Hugging Face datasets),
tokenizers (`tokenizers`), packing into blocks (`packing`), and the LightningDataModule that
ties them together (`datamodule`, the one module here that imports Lightning).
"""
