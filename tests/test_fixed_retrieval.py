"""``python -m midus fixed-retrieval`` on the tiny HML+HIVE run of the shared fixture."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch

from midus.analysis import fixed_retrieval as fr
from midus.analysis.checkpoint_run import analysis_parser, load_checkpoint_run
from midus.analysis.value_realisations import FixedRetrievalBlock, RetrievalFeed, build_realisation, trained_realisation
from midus.cli import main
from midus.model.retrieval.product_keys import ProductKeys


@pytest.fixture(scope="module")
def tiny(tiny_memory_run: Path):
    """The tiny run's model (frozen) and a recording on 3 training and 2 validation batches."""
    loaded = load_checkpoint_run(analysis_parser("fixed-retrieval", ""), ["--ckpt_path", str(tiny_memory_run)])
    model = loaded.model.requires_grad_(False)
    train_ids = fr.batched(loaded.data.train_blocks, 4, [5, 1, 7, 3, 0, 2, 9, 8, 4, 6, 11, 10])
    val_ids = fr.batched(loaded.data.val_blocks, 4, list(range(8)))
    recording = fr.record(model, [1], train_ids, val_ids)
    return model, recording


@pytest.mark.slow
def test_end_to_end_table_params_and_files(tiny_memory_run: Path, tmp_path: Path, capsys) -> None:
    main(["fixed-retrieval", "--ckpt_path", str(tiny_memory_run), "--steps", "40", "--train_batches", "4",
          "--realisations", "[hive, per_head, shared, dense_ffn, dense_ffn_heads]", "--learning_rate", "0.01",
          "--out_dir", str(tmp_path)])
    assert "| dense_ffn | 0.01 |" in capsys.readouterr().out
    with open(tmp_path / "fixed_retrieval.csv", encoding="utf-8") as handle:
        rows = {row["realisation"]: row for row in csv.DictReader(handle)}
    assert all(row["reported"] == "True" for row in rows.values())
    assert list(rows) == ["checkpoint", "zero", "hive", "per_head", "shared", "dense_ffn", "dense_ffn_heads"]
    assert all(math.isfinite(float(row[key])) for row in rows.values() for key in ("train_loss", "val_loss"))
    # The tiny memory: 4 heads of 8, 16² = 256 slots, latent 8, d_model 32.
    hive = 256 * 8 + 4 * 8 * 8
    params = {name: int(row["params"]) for name, row in rows.items()}
    assert params == {
        "checkpoint": hive, "zero": 0, "hive": hive, "per_head": 4 * 256 * 8, "shared": 256 * 8,
        "dense_ffn": 3 * 32 * 24, "dense_ffn_heads": 3 * 32 * 24,
    }
    assert abs(params["dense_ffn"] - hive) <= 0.03 * hive
    zero = rows["zero"]
    for name in ("hive", "per_head", "shared", "dense_ffn", "dense_ffn_heads"):
        # Every realisation learns: below the memory-zeroed anchor on the batches it fitted and on held-out text.
        assert float(rows[name]["train_loss"]) < float(zero["train_loss"]), name
        assert float(rows[name]["val_loss"]) < float(zero["val_loss"]), name
    assert float(zero["val_gain"]) == 0.0 and float(rows["checkpoint"]["val_gain"]) == 1.0
    assert "| realisation | learning_rate | params |" in (tmp_path / "fixed_retrieval.md").read_text()
    image = matplotlib.image.imread(tmp_path / "fixed_retrieval.png")  # a readable PNG with a figure on it
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.01, "fixed_retrieval.png is blank"


@pytest.mark.slow
def test_fit_is_deterministic_and_leaves_the_model_as_it_was(tiny) -> None:
    model, recording = tiny
    before = [type(block) for block in model.blocks]
    first = fr.fit_realisation(model, recording, "shared", 4, 0.01, seed=3)
    second = fr.fit_realisation(model, recording, "shared", 4, 0.01, seed=3)
    assert first.curve == second.curve and first.val_loss == second.val_loss
    assert [type(block) for block in model.blocks] == before


@pytest.mark.slow
def test_realisations_consume_the_recorded_retrieval_never_the_keys(tiny, monkeypatch) -> None:
    model, recording = tiny
    reference = fr.fit_realisation(model, recording, "hive", 5, 0.01, seed=0)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spying_build(name, shape):
        realisation = build_realisation(name, shape)
        realisation.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], inputs[1])))
        return realisation

    def no_retrieval(self, queries):
        raise AssertionError("the product keys were called while retrieval is held fixed")

    monkeypatch.setattr(ProductKeys, "forward", no_retrieval)
    keys = model.blocks[1].branch.keys
    original = keys.subkeys.detach().clone()
    keys.subkeys.data.normal_()  # other keys would retrieve other slots: the losses must not notice
    try:
        perturbed = fr.fit_realisation(model, recording, "hive", 5, 0.01, seed=0, build=spying_build)
    finally:
        keys.subkeys.data.copy_(original)
    assert perturbed.curve == reference.curve and perturbed.val_loss == reference.val_loss
    # 5 steps (whose final pass gives the train loss), then the evaluation of the 2 validation batches.
    expected = [recording.train[step % 3] for step in range(5)] + recording.val
    assert len(seen) == len(expected)
    for (weights, slots), batch in zip(seen, expected):
        recorded_weights, recorded_slots = batch.retrieval[1]
        assert torch.equal(weights, recorded_weights) and torch.equal(slots, recorded_slots.long())


@pytest.mark.slow
def test_hive_with_the_trained_values_reproduces_the_checkpoint(tiny) -> None:
    model, recording = tiny
    branch = model.blocks[1].branch
    outcome = fr.fit_realisation(model, recording, "checkpoint", 0, 0.01, seed=0,
                                 build=lambda name, shape: trained_realisation(branch, shape))
    assert (outcome.train_loss, outcome.val_loss) == recording.checkpoint_losses
    batch = recording.val[0]
    expected = model(batch.ids[:, :-1])
    feed = RetrievalFeed()
    feed.retrieval = batch.retrieval
    model.blocks[1] = FixedRetrievalBlock(model.blocks[1], trained_realisation(branch, recording.shapes[1]), feed, 1)
    try:
        assert torch.equal(model(batch.ids[:, :-1]), expected)
    finally:
        model.blocks[1] = model.blocks[1].block


@pytest.mark.slow
def test_checkpoint_without_memory_blocks_is_refused(tiny_memory_run: Path, tmp_path: Path, capsys) -> None:
    from midus.checkpoint.kit import MODEL_CONFIG_KEY
    from midus.model import MidusLM, ModelConfig

    vocab = load_checkpoint_run(analysis_parser("x", ""), ["--ckpt_path", str(tiny_memory_run)]).model.config.vocab_size
    config = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4)
    state = {f"model.{name}": value for name, value in MidusLM(config).state_dict().items()}
    torch.save({MODEL_CONFIG_KEY: dataclasses.asdict(config), "state_dict": state}, tmp_path / "plain.ckpt")
    run_config = tiny_memory_run.parent.parent / "config.yaml"
    with pytest.raises(SystemExit) as failure:
        main(["fixed-retrieval", "--ckpt_path", str(tmp_path / "plain.ckpt"), "--config", str(run_config),
              "--out_dir", str(tmp_path / "out")])
    assert failure.value.code == 2
    error = capsys.readouterr().err
    assert "--ckpt_path" in error and "has no HML memory block" in error and "it has no memory blocks" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--blocks", "[0]"], "--blocks: 0 is not an HML memory block"), (["--realisations", "[mlp]"], "--realisations")],
)
def test_bad_options_are_refused(tiny_memory_run: Path, tmp_path: Path, capsys, flags, message) -> None:
    with pytest.raises(SystemExit) as failure:
        main(["fixed-retrieval", "--ckpt_path", str(tiny_memory_run), "--out_dir", str(tmp_path / "out"), *flags])
    assert failure.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_each_realisation_reports_its_rate_with_the_lowest_train_loss() -> None:
    rates_and_losses = ((1e-3, 0.9), (1e-2, math.nan), (1e-1, 0.8))
    fits = [fr.Outcome("hive", 1, loss, 3.0, learning_rate=rate) for rate, loss in rates_and_losses]
    assert fr.lowest_train_loss(fits) is fits[2]
    assert fr.lowest_train_loss(fits[:2]) is fits[0]  # a diverged fit never wins
