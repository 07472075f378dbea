"""Ablations: the arms of one experiment YAML, each a full ``fit`` in its own process.

`config` reads and merges the YAML (plain Python), `command_line` parses the command line once
into the runner's flags (``--arm``, ``--seeds``, ``--fresh``, ``--tune``, ``--jobs``) and the arms'
arguments, `runner` validates and runs the arms, one or several at a time (it parses them with the kit's
LightningCLI), `resume` decides per run whether to skip, resume or start it afresh (what its run
directory holds against how it was started), `tuning` runs every arm over the tuning candidates,
and `results` writes the summary files and gives each run a TensorBoard HParams session. The
tables themselves (summary.md and .csv, means over seeds, paired verdicts) are `midus.report`'s,
and ``report`` reads the same tables back.
"""
