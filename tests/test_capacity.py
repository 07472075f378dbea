"""experiments/capacity.yaml measures what its header says: three from-scratch widths, every fact seen
100 times, and the population's bits against each model's parameters."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from midus.ablation.command_line import parse_command_line
from midus.ablation.runner import plan_arm
from midus.data.corpus import ATTRIBUTES, value_choices
from midus.model import MidusLM, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CAPACITY = ROOT / "experiments" / "capacity.yaml"


def test_capacity_arms_are_capacity_limited_and_see_every_fact_100_times() -> None:
    document = yaml.safe_load(CAPACITY.read_text())
    embedded = document["data"]["embedded"]
    # Each biography renders every fact of its person: exposures = renderings x epochs.
    assert embedded["docs_per_person"] * document["trainer"]["max_epochs"] == 100
    bits_per_person = sum(math.log2(len(value_choices(attribute))) for attribute in ATTRIBUTES)
    assert round(bits_per_person, 2) == 37.28  # the header's figure
    population_bits = embedded["num_people"] * bits_per_person
    assert round(population_bits) == 149_132
    command = parse_command_line(["fit", "--config", str(CAPACITY)])
    sizes = {}
    for arm in command.ablation.arms:
        config = dict(plan_arm(command, arm).config["model"]["config"])
        model = MidusLM(ModelConfig(**config, vocab_size=document["data"]["bpe_vocab_size"]))
        sizes[arm] = model.num_parameters()
        assert config["d_model"] == int(arm.removeprefix("d")) and config["n_layers"] == 2
        assert model.config.head_dim == 16 and not model.config.tie_embeddings  # the header counts both tables
    assert sizes == {"d32": 96_416, "d48": 147_696, "d64": 229_696}  # the header's counts
    # The header's ratios: the population's bits against each model's parameters.
    assert [round(population_bits / sizes[arm], 2) for arm in ("d32", "d48", "d64")] == [1.55, 1.01, 0.65]
