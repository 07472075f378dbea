"""An equal tuning budget for every arm: ``ablation.tune`` and ``--tune``.

An ablation YAML may name the candidate settings every arm is tuned over::

    ablation:
      tune:
        seed: 0                          # the tuning runs' seed_everything
        metric: val.loss                 # a summary.json key, lowest wins
        overrides:                       # what every tuning run changes: its own data
          data.embedded.seed: 2
          data.embedded.replay_validation: false
        candidates:
          lr_0.5x: {model.optimizer.learning_rate: 0.0005, model.memory_optimizer.learning_rate: 0.015}
          lr_1x: {model.optimizer.learning_rate: 0.001, model.memory_optimizer.learning_rate: 0.03}
      arms: ...

``python -m midus fit --config X.yaml --tune`` runs every selected arm once per candidate, as
the ablation ``<name>_tune`` with the arms ``<arm>.<candidate>`` (base ← arm ← ``overrides`` ←
candidate, one seed), so every arm gets exactly the same number of runs over the same values.
It then writes ``<save_dir>/<name>_tune/tuning.md``: per arm, each candidate's metric, the
one chosen, and whether the arm as the YAML defines it already runs with the chosen values.
The YAML stays the one record of what the reported runs use: copy the chosen values into the
arms (the table gives them as dotted keys), then run the ablation without ``--tune``.

The overrides should make the tuning runs read data that the reported runs never evaluate on
(for the embedded corpus: another population seed, and no replay text in validation), so the
choice cannot fit the reported numbers' noise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midus.ablation.command_line import TUNE_FLAG
from midus.ablation.config import Ablation, AblationError, TuneSpec, deep_merge, expand_dotted
from midus.report.table import ArmRow
from midus.run_files import value_at

TUNING_FILE = "tuning.md"


def tuning_arm(arm: str, candidate: str) -> str:
    """The tuning run's arm name: ``<arm>.<candidate>``."""
    return f"{arm}.{candidate}"


def trains_no_step(ablation: Ablation, arm: str) -> bool:
    """Whether the arm is a reference measured before any step (``trainer.max_steps: 0``): nothing to tune."""
    return value_at(deep_merge(ablation.base, ablation.arms[arm]), "trainer.max_steps") == 0


def tuned_arms(ablation: Ablation, arms: list[str]) -> list[str]:
    """The arms of `arms` that ``--tune`` runs: all but those that train no step."""
    return [arm for arm in arms if not trains_no_step(ablation, arm)]


def tuning_ablation(ablation: Ablation, arms: list[str]) -> Ablation:
    """The ablation ``<name>_tune``: each of `arms` that trains once per candidate, one seed, no
    reference; an arm's `TuneSpec.keep` keys keep the arm's own values under every candidate."""
    spec = ablation.tune
    if spec is None:
        raise AblationError(f"{ablation.path}: {TUNE_FLAG} needs an ablation.tune section (candidates to tune over)")
    expanded = {}
    for arm in tuned_arms(ablation, arms):
        held = {key: value_at(ablation.arms[arm], key) for key in spec.keep.get(arm, [])}
        for candidate, values in spec.candidates.items():
            merged = deep_merge(ablation.arms[arm], expand_dotted(spec.overrides))
            merged = deep_merge(merged, expand_dotted(values))
            expanded[tuning_arm(arm, candidate)] = deep_merge(merged, expand_dotted(held))
    if not expanded:
        raise AblationError(f"{ablation.path}: no selected arm trains a step (trainer.max_steps: 0): nothing to tune")
    base = {**ablation.base, "seed_everything": spec.seed}
    return dataclasses.replace(
        ablation, name=f"{ablation.name}_tune", base=base, arms=expanded, seeds=None, references=[], tune=None,
        control=None,
    )


@dataclass
class Choice:
    """One arm's tuning outcome."""

    arm: str
    scores: dict[str, float | None]
    """Candidate → its metric; ``inf`` for a run that failed or diverged (no finite metric), None
    for one not run yet."""
    chosen: str | None
    """The candidate with the lowest metric; None until every candidate has run (or when all failed)."""


def choose(spec: TuneSpec, arms: list[str], rows: list[ArmRow]) -> list[Choice]:
    """Per arm, each candidate's metric from the tuning runs' `rows`, and the lowest one.

    A candidate whose run failed (a crash, a diverged loss) or wrote no finite metric scores
    ``inf``: it loses to every candidate that trained, and is never dropped from the budget."""
    by_arm = {row.arm: row for row in rows}
    choices = []
    for arm in arms:
        scores: dict[str, float | None] = {}
        for candidate in spec.candidates:
            row = by_arm.get(tuning_arm(arm, candidate))
            if row is None or row.status == "not run":
                scores[candidate] = None
                continue
            value = value_at(row.record, spec.metric) if row.status == "ok" else None
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            scores[candidate] = float(value) if finite else math.inf
        finished = [name for name, score in scores.items() if score is not None]
        complete = len(finished) == len(scores) and any(math.isfinite(scores[name]) for name in finished)
        chosen = min(finished, key=lambda name: scores[name]) if complete else None
        choices.append(Choice(arm, scores, chosen))
    return choices


def _uses(ablation: Ablation, arm: str, values: dict[str, Any]) -> list[str]:
    """The dotted keys of `values` where the arm as defined (base ← arm) differs from them; the
    keys the arm keeps under tuning (`TuneSpec.keep`) are its own and never differ."""
    config = deep_merge(ablation.base, ablation.arms[arm])
    kept = set(ablation.tune.keep.get(arm, [])) if ablation.tune else set()
    return [key for key, value in values.items() if key not in kept and value_at(config, key) != value]


def tuning_markdown(ablation: Ablation, choices: list[Choice]) -> str:
    """The tuning table: one row per arm, a column per candidate, the choice and whether the YAML uses it."""
    spec = ablation.tune
    assert spec is not None
    candidates = list(spec.candidates)
    lines = [
        f"# Tuning: {ablation.name}",
        "",
        f"Every arm ran each of the {len(candidates)} candidates once (seed {spec.seed}), with "
        + (", ".join(f"`{key}: {value}`" for key, value in spec.overrides.items()) or "no further overrides")
        + f"; chosen: the lowest `{spec.metric}` (summary.json)."
        + "".join(f" `{arm}` keeps its own `{'`, `'.join(keys)}` under every candidate."
                  for arm, keys in spec.keep.items()),
        "",
        "| arm | " + " | ".join(candidates) + " | chosen | the YAML's arm |",
        "|---|" + "---|" * (len(candidates) + 2),
    ]
    for choice in choices:
        cells = [_score_cell(choice.scores[c]) for c in candidates]
        if choice.chosen is None:
            ran = all(score is not None for score in choice.scores.values())
            chosen, status = ("(every candidate failed)" if ran else "(not every candidate ran)"), ""
        else:
            values = spec.candidates[choice.chosen]
            differing = _uses(ablation, choice.arm, values)
            chosen = choice.chosen
            status = "uses it" if not differing else "set " + ", ".join(f"{k}: {values[k]}" for k in differing)
        lines.append(f"| {choice.arm} | " + " | ".join(cells) + f" | {chosen} | {status} |")
    return "\n".join(lines) + "\n"


def _score_cell(score: float | None) -> str:
    if score is None:
        return ""
    return "failed" if math.isinf(score) else f"{score:.4f}"


def write_tuning(experiment_dir: Path, ablation: Ablation, arms: list[str], rows: list[ArmRow]) -> str:
    """Write ``tuning.md`` into the tuning ablation's `experiment_dir`; returns its Markdown."""
    assert ablation.tune is not None
    text = tuning_markdown(ablation, choose(ablation.tune, arms, rows))
    experiment_dir.mkdir(parents=True, exist_ok=True)
    (experiment_dir / TUNING_FILE).write_text(text, encoding="utf-8")
    return text
