"""Analyses of trained checkpoints (head importance, fixed retrieval, memory usage)."""
