"""The docs stay true: every link resolves, every path the README's map names exists, the
README stays short, and the docs quote no measured figure: measured numbers live in one place,
experiments/README.md and the YAML headers, which the docs link to instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXPERIMENTS_README = ROOT / "experiments" / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, *GUIDES]  # prose that must link to figures instead of repeating them
LINKED = [*DOCS, EXPERIMENTS_README]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`]*`")
# A figure: a decimal number, not part of a version (0.4.13) or a name (Llama-3.2-1B, Qwen3-0.6B).
FIGURE = re.compile(r"(?<![\w.\-])\d+\.\d+(?![\w.])")
# Figures that are definitions, not measurements, each with why it may stand in the docs.
NOT_MEASURED = {
    "4.30": "the 97.5 % Student-t quantile at 2 degrees of freedom (3 seeds)",
    "0.25": "a default (replay_share) or chance level of a 4-way task",
    "0.01": "the memory-engaged threshold in nats, a definition",
    "0.05": "the memory-engaged threshold in recall, a definition",
    "0.03": "chance recall of a fact (about 1/30), a property of the corpus",
    "0.5": "chance level of a 2-way task",
    "1.0": "a definition (score scale 1: the original PKM)",
    "1.52": "an example of how a ratio column is printed",
}


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code: what the docs assert in words."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_readme_is_short_and_opens_with_install_run_test() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move long sections to docs/"
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    assert lines[first_section] == "## Install, run, test"


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")
    assert not broken, f"{path.name}: " + "; ".join(broken)


def test_every_guide_is_linked_from_the_readme() -> None:
    readme = README.read_text()
    missing = [p.name for p in GUIDES if f"(docs/{p.name}" not in readme]
    assert not missing, f"guides not reachable from README.md: {missing}"


def test_the_readme_map_names_paths_that_exist() -> None:
    paths = re.findall(r"`((?:midus|experiments|benchmarks|tests)/[\w/.\-]*)`", README.read_text())
    assert len(paths) >= 15
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README.md names paths that do not exist: {missing}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_quote_no_measured_figure(path: Path) -> None:
    quoted = set(FIGURE.findall(prose(path.read_text())))
    measured = sorted(quoted - set(NOT_MEASURED))
    assert not measured, (
        f"{path.name} quotes {measured}: measured numbers live in experiments/README.md and the YAML "
        "headers; link to the measurement instead of repeating it (or, for a definition, add it to NOT_MEASURED)"
    )
