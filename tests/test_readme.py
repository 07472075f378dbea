"""The docs' code refers to files of this repository: they exist (a rename breaks this test).

The docs are README.md and the guides in docs/. Every path in their code (fenced blocks, the
indented layout block, and inline code rooted in a repository folder) is one of:

* shipped: it exists in the repository (globs match at least one file);
* an output: written by running the kit (run folders, exports, the data cache);
* an example: a file the reader supplies; the README must say so where it uses it;
* not a path at all (a hub dataset name).

A path the docs gain that is none of these fails `test_every_path_the_readme_names_is_accounted_for`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

# Files the reader supplies; each docs section that uses one must mark it as the reader's own
# (`USER_SUPPLIED` below), since the kit does not ship it.
EXAMPLES = {
    "my_text.txt": "the text to score (Perplexity on any text)",
    "corpus/train/*.txt": "the reader's own training text (Your own data)",
    "corpus/valid.txt": "the reader's own validation text (Your own data)",
    "/path/to/Llama-3.2-1B": "a local Hugging Face checkpoint (Your own ... checkpoint)",
    "experiments/ablate_width.yaml": "the ablation YAML docs/ablations.md shows",
}
# Written by running the kit: run folders (trainer.logger save_dir), exports, the data cache.
OUTPUT_PREFIXES = ("runs/", "exports/", "data/tokenizers/")
# Names in code that are not repository paths.
NOT_PATHS = {"Salesforce/wikitext": "a dataset on the Hugging Face hub"}
# What marks a file as the reader's own in the docs section that uses it.
USER_SUPPLIED = re.compile(r"your own|any text|an example|for example|not shipped|to create|/path/to/", re.IGNORECASE)

PATH = re.compile(r"(?<![\w.<>*~/-])/?[\w.<>*~-]+(?:/[\w.<>*~-]*)+")  # at least one slash
BARE_FILE = re.compile(r"(?<![\w./-])[\w-]+\.(?:yaml|yml|py|md|txt|jsonl|json|cfg|toml|ini)\b(?!/)")
URL = re.compile(r"\w+://\S+")


def code_of(text: str) -> tuple[list[str], list[str], list[str]]:
    """The README's fenced code blocks, its indented code lines, and its inline code spans."""
    fenced, indented, prose = [], [], []
    block: list[str] | None = None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if block is None:
                block = []
            else:
                fenced.append("\n".join(block))
                block = None
        elif block is not None:
            block.append(line)
        elif line.startswith("    "):
            indented.append(line)
        else:
            prose.append(line)
    inline = re.findall(r"`([^`\n]+)`", "\n".join(prose))
    return fenced, indented, inline


def readme_paths() -> set[str]:
    fenced, indented, inline = code_of("\n".join(doc.read_text(encoding="utf-8") for doc in DOCS))
    top_level = {entry.name for entry in ROOT.iterdir() if entry.is_dir() and not entry.name.startswith(".")}
    roots = top_level | {prefix.split("/")[0] for prefix in OUTPUT_PREFIXES} | {"corpus"}
    found: set[str] = set()
    for code in fenced:
        code = URL.sub(" ", code)
        found |= set(PATH.findall(code)) | set(BARE_FILE.findall(code))
    for code in indented:
        found |= set(PATH.findall(code))
    for code in inline:
        found |= {path for path in PATH.findall(URL.sub(" ", code)) if path.split("/")[0] in roots}
    return found


def shipped(path: str) -> bool:
    """Whether `path` exists in the repository: a glob matches a file, a bare file name is some
    file's name (as "as in quickstart.yaml" means experiments/quickstart.yaml)."""
    if "/" not in path.rstrip("/"):
        if path.endswith("/"):
            return (ROOT / path).is_dir()
        return (ROOT / path).is_file() or any(ROOT.glob(f"*/{path}"))
    if "*" in path:
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


PATHS = sorted(readme_paths())
SHIPPED = [p for p in PATHS if p not in EXAMPLES and p not in NOT_PATHS and not p.startswith(OUTPUT_PREFIXES)]


def test_the_readme_names_the_kits_main_files() -> None:
    # Guards the extraction itself: a parser that finds nothing would pass every check below.
    for path in ("experiments/quickstart.yaml", "experiments/ablate_hive.yaml", "experiments/ablate_branches.yaml",
                 "experiments/pretrain_base.yaml", "experiments/dus_vs_midus.yaml", "tests/data/lm_eval_task",
                 "benchmarks/branches.py", "midus/model/retrieval/product_keys.py", "midus/cli.py", *EXAMPLES):
        assert path in PATHS, path
    assert "runs/quickstart/ffn/checkpoints/last.ckpt" in PATHS and "val/loss" not in PATHS


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_path_exists(path: str) -> None:
    assert shipped(path), f"the docs name {path!r}, which is not in the repository (renamed or removed?)"


def test_every_path_the_readme_names_is_accounted_for() -> None:
    # Templates such as runs/<name>/<arm> are outputs; nothing else may be a placeholder.
    placeholders = [p for p in PATHS if "<" in p and not p.startswith(OUTPUT_PREFIXES)]
    assert placeholders == []
    # A listed example or non-path that the docs no longer mention is stale here.
    assert set(EXAMPLES) | set(NOT_PATHS) <= set(PATHS)


def readme_section(path: str) -> str:
    """The docs section (from its heading to the next heading) where `path` first appears."""
    sections = [
        section
        for doc in DOCS
        for section in re.split(r"^(?=#{1,4} )", doc.read_text(encoding="utf-8"), flags=re.MULTILINE)
    ]
    return next(section for section in sections if path in section)


@pytest.mark.parametrize("path", list(EXAMPLES))
def test_examples_are_marked_as_the_readers_own_files(path: str) -> None:
    section = readme_section(path)
    message = f"the docs use {path!r} ({EXAMPLES[path]}) without saying the reader supplies it"
    assert USER_SUPPLIED.search(section), message
