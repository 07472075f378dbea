"""Ablations: the arms of one experiment YAML, each a full ``fit`` in its own process.

`config` reads and merges the YAML (plain Python), `command_line` parses the command line once
into the runner's flags (``--arm``, ``--seeds``, ``--fresh``, ``--tune``, ``--jobs``) and the arms'
arguments, `runner` validates and runs the arms (it parses them with the kit's LightningCLI),
`resume` decides per run whether to skip, resume or start it afresh (what its run directory holds
against how it was started), `parallel` runs several at a time, `tuning` runs every arm over the
tuning candidates, and `hparams` gives each run a TensorBoard HParams session. The tables of the
results (summary.md and .csv, means over seeds, paired verdicts) are `midus.report`'s: the runner
writes them with it, and ``report`` reads the same tables back.
"""
