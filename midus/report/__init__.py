"""``python -m midus report``: report.md and plots of an experiment folder, from its files alone.

`arms` reads the folder, `plots` draws the PNGs, `build` writes report.md (the command).
Never imports Lightning, datasets or transformers: reporting needs only the run files.
"""
