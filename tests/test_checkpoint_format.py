"""The kit checkpoint format: what ``fit`` writes loads without unpickling kit classes, and
checkpoints written before a class moved still load (`midus.checkpoint.kit.MOVED_MODULES`)."""

from __future__ import annotations

import dataclasses
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from midus.checkpoint import MODEL_CONFIG_KEY, read_kit_checkpoint
from midus.data.sources import EmbeddedCorpusConfig
from midus.model import MidusLM, ModelConfig


def save_as_before_the_move(path: Path, payload: dict) -> None:
    """torch.save with EmbeddedCorpusConfig pickled under its old module, midus.training.data_module."""
    old = "midus.training.data_module"
    module = types.ModuleType(old)
    module.EmbeddedCorpusConfig = EmbeddedCorpusConfig  # type: ignore[attr-defined]
    sys.modules[old] = module
    EmbeddedCorpusConfig.__module__ = old
    try:
        torch.save(payload, path)
    finally:
        EmbeddedCorpusConfig.__module__ = "midus.data.sources"
        del sys.modules[old]


def test_a_checkpoint_pickled_before_the_data_package_moved_still_reads(tmp_path: Path) -> None:
    model = MidusLM(ModelConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2))
    path = tmp_path / "old.ckpt"
    save_as_before_the_move(path, {
        "state_dict": {f"model.{name}": value for name, value in model.state_dict().items()},
        MODEL_CONFIG_KEY: dataclasses.asdict(model.config),
        "datamodule_hyper_parameters": {"embedded": EmbeddedCorpusConfig(seed=3), "block_size": 64},
    })
    with zipfile.ZipFile(path) as archive:  # the pickle names the class's old home
        pickled = next(archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    assert b"midus.training.data_module" in pickled and b"midus.data.text_data" not in pickled
    checkpoint = read_kit_checkpoint(path)
    assert checkpoint["datamodule_hyper_parameters"]["embedded"] == EmbeddedCorpusConfig(seed=3)
    assert isinstance(checkpoint["datamodule_hyper_parameters"]["embedded"], EmbeddedCorpusConfig)
    assert "midus.training.data_module" not in sys.modules


def test_a_checkpoint_pickled_while_the_corpus_config_lived_in_text_data_still_reads(tmp_path: Path) -> None:
    # Issue 28 moved EmbeddedCorpusConfig from midus.data.text_data to midus.data.sources.
    path = tmp_path / "old.ckpt"
    EmbeddedCorpusConfig.__module__ = "midus.data.text_data"
    try:
        torch.save({MODEL_CONFIG_KEY: dataclasses.asdict(ModelConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2)),
                    "datamodule_hyper_parameters": {"embedded": EmbeddedCorpusConfig(seed=3)}}, path)
    finally:
        EmbeddedCorpusConfig.__module__ = "midus.data.sources"
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    assert b"midus.data.text_data" in pickled and b"midus.data.sources" not in pickled
    embedded = read_kit_checkpoint(path)["datamodule_hyper_parameters"]["embedded"]
    assert isinstance(embedded, EmbeddedCorpusConfig) and embedded == EmbeddedCorpusConfig(seed=3)



def test_a_checkpoint_pickled_while_the_probe_config_had_its_own_module_still_reads(tmp_path: Path) -> None:
    # Issue 28 moved ProbeConfig from midus.probes.config into midus.probes.validation.
    from midus.probes import ProbeConfig

    path = tmp_path / "old.ckpt"
    old = types.ModuleType("midus.probes.config")
    old.ProbeConfig = ProbeConfig  # type: ignore[attr-defined]
    sys.modules[old.__name__], ProbeConfig.__module__ = old, old.__name__
    try:
        torch.save({MODEL_CONFIG_KEY: dataclasses.asdict(ModelConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2)),
                    "hyper_parameters": {"probes": ProbeConfig(recall_questions=7)}}, path)
    finally:
        ProbeConfig.__module__ = "midus.probes.validation"
        del sys.modules[old.__name__]
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    assert b"midus.probes.config" in pickled
    probes = read_kit_checkpoint(path)["hyper_parameters"]["probes"]
    assert isinstance(probes, ProbeConfig) and probes == ProbeConfig(recall_questions=7)


@pytest.mark.slow
def test_a_fit_checkpoint_is_plain_data_that_loads_weights_only(tiny_memory_run: Path) -> None:
    # LightningCLI reads --ckpt_path hyperparameters with torch.load(weights_only=True): every
    # entry the kit and Lightning store must be plain data (dicts, lists, numbers, strings).
    checkpoint = torch.load(tiny_memory_run, map_location="cpu", weights_only=True)
    assert isinstance(checkpoint["hyper_parameters"]["config"], dict)
    assert isinstance(checkpoint["datamodule_hyper_parameters"]["embedded"], dict)
    assert checkpoint["datamodule_hyper_parameters"]["block_size"] == 32
    assert checkpoint[MODEL_CONFIG_KEY]["memory"]["n_subkeys"] == 16
