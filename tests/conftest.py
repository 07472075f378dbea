"""Shared fixtures: tiny data modules and models that keep the suite fast on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Run the suite's tiny models on one thread.

    Tiny matmuls gain nothing from threads, and on a busy machine OpenMP threads that wait
    for each other made a 12-token generate take 2.5 s instead of 0.04 s.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def no_help_docstrings():
    """Skip parsing field docstrings in in-process CLI runs.

    They only make ``--help`` text (tested in a subprocess, which keeps them) and cost about
    3 s per in-process ``midus.cli.main`` call.
    """
    from jsonargparse import set_parsing_settings

    import midus.training.cli  # noqa: F401 -- sets the kit's parsing settings first, which this overrides

    set_parsing_settings(docstring_parse_attribute_docstrings=False)
    yield
    set_parsing_settings(docstring_parse_attribute_docstrings=True)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer cache for the whole session, so BPE training happens once per corpus."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def tiny_data(tiny_cache: Path):
    """A small embedded-corpus data module (30 people, BPE of 300 tokens, blocks of 32)."""
    from midus.data.datamodule import EmbeddedCorpusConfig, LanguageModelingData

    return LanguageModelingData(
        embedded=EmbeddedCorpusConfig(seed=0, num_people=30, docs_per_person=4),
        bpe_vocab_size=300,
        block_size=32,
        batch_size=8,
        cache_dir=str(tiny_cache),
    )


@pytest.fixture(scope="session")
def tiny_memory_run(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    """A real ``fit`` of a tiny T M T model (an HML+HIVE memory block at layer 1, 4 heads);
    returns its ``last.ckpt`` (the run's ``config.yaml`` lies beside ``checkpoints/``)."""
    from midus.cli import main

    root = Path(__file__).resolve().parents[1]
    runs = tmp_path_factory.mktemp("memory_run")
    main([
        "fit", "--config", str(root / "experiments" / "quickstart.yaml"),
        "--trainer.max_steps", "60",
        "--trainer.val_check_interval", "30",
        "--trainer.log_every_n_steps", "10",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--model.optimizer.learning_rate", "0.01",
        "--model.config.d_model", "32",
        "--model.config.n_layers", "3",
        "--model.config.n_heads", "4",
        "--model.config.n_kv_heads", "2",
        "--model.config.memory_layers", "[1]",
        "--model.config.memory_branch", "hml",
        "--model.config.memory.n_subkeys", "16",
        "--model.config.memory.topk", "4",
        "--model.config.memory.latent_dim", "8",
        "--model.config.memory.zero_init_values", "false",
        "--model.probes.recall_questions", "0",
        "--data.embedded.num_people", "20",
        "--data.embedded.docs_per_person", "3",
        "--data.bpe_vocab_size", "300",
        "--data.block_size", "32",
        "--data.batch_size", "8",
        "--data.cache_dir", str(tiny_cache),
    ])
    (checkpoint,) = runs.glob("*/*/checkpoints/last.ckpt")
    return checkpoint


@pytest.fixture
def transformers_warnings() -> list[str]:
    """Warnings transformers logs while a test runs (load reports, RoPE checks, untied heads, config checks)."""
    import logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    library_logger = logging.getLogger("transformers")  # transformers does not propagate to root
    library_logger.addHandler(handler)
    yield messages
    library_logger.removeHandler(handler)
