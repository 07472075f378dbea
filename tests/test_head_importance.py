"""``python -m midus head-importance`` and the per-head gate hooks (`midus.model.head_gates`) it relies on."""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

from midus.analysis.checkpoint_run import analysis_parser, load_checkpoint_run
from midus.analysis.memory_report import validation_batches
from midus.checkpoint.kit import MODEL_CONFIG_KEY, model_from_checkpoint, read_kit_checkpoint
from midus.cli import main
from midus.model import MidusLM, ModelConfig
from midus.model.head_gates import gated_memory_heads

ZEROED_HEAD = 2
HEAD_PROJ = "model.blocks.1.branch.head_proj"


@pytest.fixture(scope="module")
def zeroed_head_run(tiny_memory_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny memory run whose HIVE head `ZEROED_HEAD` has a zero projection P_h."""
    run = tmp_path_factory.mktemp("zeroed_head_run")
    checkpoint = torch.load(tiny_memory_run, map_location="cpu", weights_only=False)
    checkpoint["state_dict"][HEAD_PROJ] = checkpoint["state_dict"][HEAD_PROJ].clone()
    checkpoint["state_dict"][HEAD_PROJ][ZEROED_HEAD] = 0.0
    (run / "checkpoints").mkdir()
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    shutil.copy(tiny_memory_run.parent.parent / "config.yaml", run / "config.yaml")
    return run / "checkpoints" / "last.ckpt"


def tiny_model(checkpoint_path: Path) -> MidusLM:
    return model_from_checkpoint(read_kit_checkpoint(checkpoint_path), checkpoint_path)


@pytest.mark.slow
def test_head_gate_leaves_the_default_path_and_state_dict_unchanged(tiny_memory_run: Path) -> None:
    model = tiny_model(tiny_memory_run)
    keys = model.blocks[1].branch.keys
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    names = set(model.state_dict())
    with torch.no_grad():
        ungated = model(ids)
        with gated_memory_heads({"1": keys}) as gate:
            gate["1"] = torch.ones(keys.n_heads)
            assert torch.equal(model(ids), ungated)  # × 1 is exact
            assert set(model.state_dict()) == names  # the gate is no parameter or buffer
            gate["1"] = None
            assert torch.equal(model(ids), ungated)
        assert not keys._forward_hooks  # the gate hooks are gone after the analysis
        assert torch.equal(model(ids), ungated)


@pytest.mark.slow
def test_gating_a_head_equals_zeroing_its_values(tiny_memory_run: Path) -> None:
    model = tiny_model(tiny_memory_run)
    branch = model.blocks[1].branch
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        gate = torch.ones(branch.keys.n_heads)
        gate[ZEROED_HEAD] = 0.0
        with gated_memory_heads({"1": branch.keys}) as gates:
            gates["1"] = gate
            gated = model(ids)
        branch.head_proj[ZEROED_HEAD] = 0.0
        assert torch.equal(model(ids), gated)
        assert not torch.equal(gated, full)


@pytest.mark.parametrize("branch, memory", [
    ("hml", {"values": "per_head"}), ("hml", {"values": "shared", "combine": "sum"}),
    ("hml", {"values": "hive", "combine": "sum"}), ("multihead_pkm", {"pkm_heads": 3}), ("pkm", {}),
])
def test_a_zero_gate_removes_exactly_that_heads_read(branch: str, memory: dict) -> None:
    torch.manual_seed(0)
    model = MidusLM(ModelConfig(
        vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, memory_layers=[1], memory_branch=branch,
        memory={"n_subkeys": 8, "topk": 4, "latent_dim": 8, "zero_init_values": False, **memory},
    )).eval()
    module = model.blocks[1].branch
    heads = torch.randn(2, 6, 32)

    def output(gate: list[float]) -> torch.Tensor:
        with gated_memory_heads({"1": module.keys}) as gates:
            gates["1"] = torch.tensor(gate)
            return module(heads)

    with torch.no_grad():
        n_heads = module.keys.n_heads
        assert torch.equal(output([0.0] * n_heads), torch.zeros(2, 6, 32))
        for head in range(n_heads):
            alone = [float(other == head) for other in range(n_heads)]
            without = [1.0 - value for value in alone]
            # The read is linear in the weights: all heads = the others + this one alone.
            torch.testing.assert_close(output([1.0] * n_heads), output(without) + output(alone))


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_head_importance_ranks_a_silenced_head_last(zeroed_head_run: Path, tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "analysis"
    main(["head-importance", "--ckpt_path", str(zeroed_head_run), "--out_dir", str(out_dir), "--max_batches", "2"])
    rows = read_rows(out_dir / "head_importance.csv")
    assert [(row["block"], int(row["head"])) for row in rows] == [("1", head) for head in range(4)]
    increase = {int(row["head"]): float(row["loss_increase"]) for row in rows}
    grad_x_act = {int(row["head"]): float(row["grad_x_act"]) for row in rows}
    assert increase[ZEROED_HEAD] == 0.0 and grad_x_act[ZEROED_HEAD] == 0.0
    others = [head for head in range(4) if head != ZEROED_HEAD]
    assert all(abs(increase[head]) > 0 and grad_x_act[head] > 0 for head in others)
    assert min(grad_x_act, key=grad_x_act.get) == ZEROED_HEAD
    assert min(increase, key=lambda head: abs(increase[head])) == ZEROED_HEAD
    assert len({row["baseline_loss"] for row in rows}) == 1
    # The baseline and each loss increase, recomputed: the mean next-token cross-entropy over the
    # same 2 validation batches, with no head removed and with each head's gate at zero.
    run = load_checkpoint_run(analysis_parser("test", "test"), ["--ckpt_path", str(zeroed_head_run)])
    keys = run.model.blocks[1].branch.keys

    def mean_loss(removed: int | None) -> float:
        total, count = 0.0, 0
        with torch.no_grad(), gated_memory_heads({"1": keys}) as gates:
            gates["1"] = None if removed is None else (torch.arange(keys.n_heads) != removed).float()
            for inputs, targets in validation_batches(run.data, 2, torch.device("cpu")):
                logits = run.model(inputs).double()
                total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
                count += targets.numel()
        return total / count

    baseline = mean_loss(None)
    assert float(rows[0]["baseline_loss"]) == pytest.approx(baseline, rel=1e-5)
    for head in range(4):
        assert increase[head] == pytest.approx(mean_loss(head) - baseline, abs=1e-5), head
    image = matplotlib.image.imread(out_dir / "head_importance.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    events = EventAccumulator(str(zeroed_head_run.parent.parent))
    events.Reload()
    assert "analysis/head_importance" in events.Tags()["images"]
    printed = capsys.readouterr().out
    assert "baseline loss" in printed and "head_importance.csv" in printed


def checkpoint_without_memory(tiny_memory_run: Path, folder: Path) -> Path:
    """A kit checkpoint of a plain Transformer with the tiny run's vocabulary."""
    vocab_size = read_kit_checkpoint(tiny_memory_run)[MODEL_CONFIG_KEY]["vocab_size"]
    config = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    state = {f"model.{name}": value for name, value in MidusLM(config).state_dict().items()}
    path = folder / "plain.ckpt"
    torch.save({MODEL_CONFIG_KEY: dataclasses.asdict(config), "state_dict": state}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["head-importance", "memory-usage"])
def test_a_checkpoint_without_memory_blocks_is_refused(
    command: str, tiny_memory_run: Path, tmp_path: Path, capsys
) -> None:
    plain = checkpoint_without_memory(tiny_memory_run, tmp_path)
    out_dir = tmp_path / "analysis"
    with pytest.raises(SystemExit) as failure:
        main([command, "--ckpt_path", str(plain), "--config", str(tiny_memory_run.parent.parent / "config.yaml"),
              "--out_dir", str(out_dir)])
    assert failure.value.code == 2
    error = capsys.readouterr().err
    assert "--ckpt_path" in error and "has no memory blocks" in error and str(plain) in error
    assert not out_dir.exists() and not list(tmp_path.glob("events.out.tfevents.*"))
