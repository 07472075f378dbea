"""Evaluation of kit checkpoints on external benchmarks.

`midus.evaluation.lm_eval_adapter` makes a checkpoint an lm-evaluation-harness model
(``MidusEvalLM``, registered as ``midus``); ``python -m midus lm-eval`` runs the harness on it.
Neither is imported here: the harness is an optional extra (``pip install "midus[eval]"``).
Both read checkpoints through `midus.checkpoint` and never import Lightning.
"""
