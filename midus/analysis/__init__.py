"""Analyses of trained checkpoints: head importance, fixed retrieval and memory usage.

Each reads a kit checkpoint (`midus.checkpoint`) and the prepared text of its run
(`midus.data.text_data.TextData`), and never Lightning. Retrieval is observed or steered only
through forward hooks that the analysis attaches and removes (`head_gate`,
`midus.model.retrieval.slot_usage`), never by setting attributes on the model's modules.

`cost_model` is the exception that reads no checkpoint: FLOP and byte formulas of the block
kinds and a roofline time, which benchmarks/cost_scaling.py prints beside its measurements.
"""
