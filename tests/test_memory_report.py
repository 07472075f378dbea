"""``python -m midus memory-usage``: its statistics against an independent recount of slot reads."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from midus.analysis.checkpoint_run import analysis_parser, load_checkpoint_run
from midus.analysis.memory_report import access_histogram, collect_slot_usage, validation_batches
from midus.cli import main
from midus.model.retrieval.product_keys import ProductKeys

MAX_BATCHES = 3


@pytest.fixture(scope="module")
def recount(tiny_memory_run: Path) -> tuple[np.ndarray, int, int, np.ndarray]:
    """Slot reads per head (H, N) counted from the ProductKeys outputs by a forward hook, tokens, k,
    and per head the mean entropy of one query's k retrieval weights (H,), from the same outputs."""
    run = load_checkpoint_run(analysis_parser("test", "test"), ["--ckpt_path", str(tiny_memory_run)])
    (keys,) = [module for module in run.model.modules() if isinstance(module, ProductKeys)]
    read: list[np.ndarray] = []
    weighed: list[np.ndarray] = []

    def hook(module, inputs, output) -> None:
        weights, slots = output
        read.append(slots.reshape(-1, *slots.shape[-2:]).numpy())
        weighed.append(weights.reshape(-1, *weights.shape[-2:]).double().numpy())

    keys.register_forward_hook(hook)
    tokens = 0
    with torch.no_grad():
        for inputs, _ in validation_batches(run.data, MAX_BATCHES, torch.device("cpu")):
            run.model(inputs)
            tokens += inputs.numel()
    slots = np.concatenate(read)  # (tokens, H, k)
    counts = np.stack([np.bincount(slots[:, head].ravel(), minlength=keys.n_slots) for head in range(keys.n_heads)])
    weights = np.concatenate(weighed)  # (tokens, H, k), each row summing to 1
    entropy = -(weights * np.log(np.where(weights > 0, weights, 1.0))).sum(-1).mean(0)
    return counts, tokens, keys.topk, entropy


@pytest.mark.slow
def test_memory_usage_csv_matches_a_brute_force_recount(
    tiny_memory_run: Path, recount: tuple[np.ndarray, int, int, np.ndarray], tmp_path: Path, capsys
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    counts, tokens, k, entropy = recount
    out_dir = tmp_path / "analysis"
    main(["memory-usage", "--ckpt_path", str(tiny_memory_run), "--out_dir", str(out_dir),
          "--max_batches", str(MAX_BATCHES)])
    with (out_dir / "memory_usage.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["block"], int(row["head"])) for row in rows] == [("1", head) for head in range(counts.shape[0])]
    n_slots = counts.shape[1]
    for row, head_counts, head_entropy in zip(rows, counts, entropy):
        share = head_counts / head_counts.sum()
        kl = sum(p * math.log(p * n_slots) for p in share if p > 0)
        assert int(row["tokens"]) == tokens and int(row["reads"]) == tokens * k == head_counts.sum()
        assert float(row["usage"]) == pytest.approx((head_counts > 0).mean(), abs=1e-12)
        assert float(row["kl_uniform"]) == pytest.approx(kl, rel=1e-9)
        assert int(row["never_read"]) == (head_counts == 0).sum() and int(row["max_reads"]) == head_counts.max()
        # Between one-hot and uniform over k, and the recount's mean over the same queries.
        assert 0.05 < float(row["entropy"]) <= math.log(k) + 1e-6
        assert float(row["entropy"]) == pytest.approx(head_entropy, rel=1e-5)
    image = matplotlib.image.imread(out_dir / "memory_usage.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 500
    events = EventAccumulator(str(tiny_memory_run.parent.parent))
    events.Reload()
    assert "analysis/memory_usage" in events.Tags()["images"]
    assert "kl_uniform" in capsys.readouterr().out


@pytest.mark.slow
def test_access_histogram_accounts_for_every_slot_and_read(tiny_memory_run: Path, recount) -> None:
    counts, tokens, k, _ = recount
    run = load_checkpoint_run(analysis_parser("test", "test"), ["--ckpt_path", str(tiny_memory_run)])
    usages, tracked_tokens = collect_slot_usage(
        run.model, validation_batches(run.data, MAX_BATCHES, torch.device("cpu"))
    )
    tracked = usages["1"].counts.view(counts.shape).numpy()
    assert tracked_tokens == tokens and np.array_equal(tracked, counts)
    for head_counts in tracked:
        edges, slots_per_bin = access_histogram(head_counts)
        assert slots_per_bin.sum() == head_counts.size  # every slot in one bin
        assert slots_per_bin[0] == (head_counts == 0).sum() and edges[:2].tolist() == [0, 1]  # never-read bin
        reads, _ = np.histogram(head_counts, bins=edges, weights=head_counts)
        assert reads.sum() == tokens * k  # and every read
    heavy = np.array([0, 0, 5, 70, 900, 1])
    edges, slots_per_bin = access_histogram(heavy)
    assert edges[0] == 0 and edges[1] == 1 and edges[-1] >= 900 and slots_per_bin.sum() == heavy.size
    assert slots_per_bin[0] == 2
