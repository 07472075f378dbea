"""`model.compute.compile: true` runs repeat bit for bit: the CLI turns on PyTorch's deterministic mode.

Without it, inductor's kernels accumulate the embedding gradient with atomic adds, and two
compiled quickstart runs of the same seed differed by step 39 (2026-12-02, 2 CPU cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from midus.data.datamodule import LanguageModelingData
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.training.cli import MidusCLI
from midus.training.config import ComputeConfig
from tests.test_cli import tiny_overrides
from tests.test_training import tiny_config


@pytest.fixture(autouse=True)
def restore_deterministic_mode():
    """The mode is process-wide: put back what the test found."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def build_cli(tmp_path: Path, cache: Path, *extra: str) -> MidusCLI:
    torch.use_deterministic_algorithms(False)
    return MidusCLI(
        CausalLM, LanguageModelingData, run=False, auto_configure_optimizers=False,
        args=[*tiny_overrides(tmp_path, cache), *extra],
    )


def test_compile_gets_lightnings_deterministic_warn_mode(tmp_path: Path, tiny_cache: Path) -> None:
    cli = build_cli(tmp_path, tiny_cache, "--model.compute.compile=true")
    assert cli.config["trainer"]["deterministic"] == "warn"  # what the saved config.yaml records
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()


def test_an_explicit_deterministic_setting_is_kept(tmp_path: Path, tiny_cache: Path) -> None:
    cli = build_cli(tmp_path, tiny_cache, "--model.compute.compile=true", "--trainer.deterministic=false")
    assert cli.config["trainer"]["deterministic"] is False
    assert not torch.are_deterministic_algorithms_enabled()


def test_eager_runs_leave_the_mode_alone(tmp_path: Path, tiny_cache: Path) -> None:
    cli = build_cli(tmp_path, tiny_cache)
    assert cli.config["trainer"]["deterministic"] is None
    assert not torch.are_deterministic_algorithms_enabled()


def test_compiling_without_deterministic_mode_warns() -> None:
    torch.use_deterministic_algorithms(False)
    module = CausalLM(tiny_config(64), probes=ProbeConfig(recall_questions=0), compute=ComputeConfig(compile=True))
    with pytest.warns(UserWarning, match="trainer.deterministic: warn"):
        module.configure_model()  # wraps the model; nothing is traced until it is called
    torch.use_deterministic_algorithms(True, warn_only=True)
    module = CausalLM(tiny_config(64), probes=ProbeConfig(recall_questions=0), compute=ComputeConfig(compile=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.configure_model()


# Each run in its own process, as two `python -m midus fit` runs are: the atomic adds race
# between threads, so the difference shows across processes.
TRAIN_COMPILED = """
import hashlib, sys, torch
from midus.model import MidusLM, ModelConfig
from midus.model.transformer import next_token_loss
if sys.argv[1] == "deterministic":
    torch.use_deterministic_algorithms(True, warn_only=True)
torch.manual_seed(0)
model = MidusLM(ModelConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True, vocab_size=1024))
model.compile()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
batches = torch.Generator().manual_seed(0)
for _ in range(12):
    ids = torch.randint(0, 1024, (32, 129), generator=batches)
    next_token_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad()
print(hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest())
"""


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MIDUS_INDUCTOR_TESTS") != "1", reason="inductor kernels build slowly: set MIDUS_INDUCTOR_TESTS=1"
)
def test_compiled_training_repeats_bit_for_bit_in_deterministic_mode() -> None:
    def weights_after_training(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", TRAIN_COMPILED, mode], capture_output=True, text=True, check=True)
        return done.stdout.split()[-1]

    assert weights_after_training("deterministic") == weights_after_training("deterministic")
