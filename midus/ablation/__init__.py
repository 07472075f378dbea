"""Ablations: the arms of one experiment YAML, each a full ``fit`` in its own process.

`config` reads and merges the YAML (plain Python), `command_line` parses the command line once
into the runner's flags (``--arm``, ``--seeds``, ``--fresh``, ``--tune``, ``--jobs``) and the arms'
arguments, `runner` validates and runs the
arms (it parses them with the kit's LightningCLI), `resume` decides per run whether to skip,
resume or start it afresh (what its run directory holds against how it was started), `table`
builds the summary table from each run's ``summary.json`` (plain Python; ``report`` uses it
too), `intervals` and `seed_table` give means over seeds with 95 % t-intervals and paired
verdicts against a reference arm, `summary_files` writes the tables, and `hparams` gives each
run a TensorBoard HParams session.
"""
