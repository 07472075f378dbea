"""Ablations: the arms of one experiment YAML, each a full ``fit`` in its own process.

`config` reads and merges the YAML (plain Python), `runner` validates and runs the arms (it
parses them with the kit's LightningCLI), `resume` decides per arm whether to skip, resume or
start it afresh (what its run directory holds against how it was started), `table` builds
the summary table from each arm's ``summary.json`` (plain Python; ``report`` uses it too).
"""
