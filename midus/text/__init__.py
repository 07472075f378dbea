"""Text handling: tokenizers, data sources, packing into blocks, recall-probe scoring."""
