"""midus: an experiment kit for memory-infused depth up-scaling of language models."""

__version__ = "0.1.0"
