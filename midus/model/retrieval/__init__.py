"""Product-key retrieval (sub-key scores, candidate pairs, top-k), weighted value lookup, and
slot-usage tracking through forward hooks; plain PyTorch, shared by every memory branch. The
custom ops they run (fakes and backwards included) live in `ops`."""
