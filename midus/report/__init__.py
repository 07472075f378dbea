"""The results of an experiment folder: its tables, and ``python -m midus report``'s report.md and plots.

`table` is the table of runs (one row per run from its ``summary.json``; `COLUMNS` says what it
shows), `intervals` and `seed_table` give means over seeds with 95 % t-intervals and paired
verdicts against a reference arm (the ablation runner writes them into an experiment folder
after its arms: `midus.ablation.results`). `arms` reads a folder's event files and summaries,
`seed_bands` and `plots` draw the PNGs, `build` writes report.md (the command).

Never imports Lightning, datasets or transformers, nor the kit's higher layers: reporting needs only
the run files (`midus.run_files`), and the ablation runner sits above it.
"""
