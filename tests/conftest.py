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


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer cache for the whole session, so BPE training happens once per corpus."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def tiny_data(tiny_cache: Path):
    """A small embedded-corpus data module (30 people, BPE of 300 tokens, blocks of 32)."""
    from midus.training.data_module import EmbeddedCorpusConfig, LanguageModelingData

    return LanguageModelingData(
        embedded=EmbeddedCorpusConfig(seed=0, num_people=30, docs_per_person=4),
        bpe_vocab_size=300,
        block_size=32,
        batch_size=8,
        cache_dir=str(tiny_cache),
    )
