"""What makes a small model's training step cheap keeps the step's results: the fused AdamW
equals the default one, the rotary shortcut equals the rotation, values logged only on the
logger's steps are all there, and a freed activation stays in the heap for the next step."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from midus.host_allocator import ENV, keep_freed_memory
from midus.model import MidusLM, ModelConfig
from midus.model.rotary import RotaryEmbedding, apply_rotary
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.training.config import OptimizerConfig, ScheduleConfig
from midus.training.optim import fused_adamw_supported, parameter_groups
from tests.conftest import SHARED_DATA
from tests.test_training import quiet_trainer, tiny_config


def test_fused_adamw_is_opt_in_and_follows_the_default_one() -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    models = [MidusLM(config), MidusLM(config)]
    models[1].load_state_dict(models[0].state_dict())
    for fused in (True, False):
        module = CausalLM(config, probes=ProbeConfig(recall_questions=0), optimizer=OptimizerConfig(fused=fused))
        assert bool(module.optimizer_and_schedule(10)["optimizer"].defaults["fused"]) is fused
    optimizers = [torch.optim.AdamW(parameter_groups(model, 0.1), lr=3e-3, fused=fused)
                  for model, fused in zip(models, (True, False))]
    ids = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(20):
        for model, optimizer in zip(models, optimizers):
            torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    moved = sum((a - b).abs().sum() for a, b in zip(models[0].parameters(), MidusLM(config).parameters()))
    assert moved > 1.0  # the weights did train
    for fused, default in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(fused, default, rtol=1e-4, atol=1e-6)


def test_fused_adamw_only_where_its_kernel_takes_every_parameter() -> None:
    cpu = torch.nn.Parameter(torch.zeros(3))
    assert fused_adamw_supported([{"params": [cpu]}])
    assert not fused_adamw_supported([{"params": [cpu, torch.nn.Parameter(torch.zeros(3, device="meta"))]}])
    assert not fused_adamw_supported([{"params": []}])


def test_the_rotary_shortcut_rotates_each_pair_by_its_angle() -> None:
    head_dim, positions = 8, torch.arange(5, 11)
    rotary = RotaryEmbedding(head_dim, theta=10000.0)
    x = torch.randn(2, 3, len(positions), head_dim)
    rotated = apply_rotary(x, *rotary(positions, x.dtype))
    half = head_dim // 2
    angles = positions[:, None].double() * rotary.inv_freq.double()[None, :]  # (time, half)
    first, second = x[..., :half].double(), x[..., half:].double()  # Llama pairs dimension i with i + half
    cos, sin = angles.cos(), angles.sin()
    expected = torch.cat((first * cos - second * sin, second * cos + first * sin), -1)
    torch.testing.assert_close(rotated.double(), expected, rtol=1e-5, atol=1e-5)


def test_values_logged_on_the_loggers_steps_only_are_all_written(tiny_data, tmp_path: Path) -> None:
    module = CausalLM(tiny_config(tiny_data.vocab_size), probes=ProbeConfig(recall_questions=0),
                      schedule=ScheduleConfig(warmup_steps=2))
    logger = TensorBoardLogger(str(tmp_path), name="run", version="0", default_hp_metric=False)
    trainer = quiet_trainer(max_steps=15, limit_val_batches=0, log_every_n_steps=3, logger=logger)
    trainer.fit(module, tiny_data)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    steps = {tag: [event.step for event in events.Scalars(tag)]
             for tag in ("train/loss", "train/lr", "train/tokens", "train/tokens_per_sec")}
    assert steps["train/loss"] == [2, 5, 8, 11, 14]
    assert steps["train/lr"] == steps["train/tokens"] == steps["train/loss"]
    assert steps["train/tokens_per_sec"] == [11, 14]  # Throughput's rates need a full window of 10 updates
    tokens = [event.value for event in events.Scalars("train/tokens")]
    per_step = tiny_data.settings["batch_size"] * tiny_data.settings["block_size"]
    assert tokens == [step * 3 * per_step for step in range(1, 6)]
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))  # the newest step's, every step


HEAP_AFTER_A_STEP = """
import ctypes, torch
from midus.host_allocator import keep_freed_memory
keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
activation = torch.ones(4 << 20)  # 16 MiB, the size of a large activation
mapped = libc.mallinfo2().hblkhd  # bytes in blocks malloc mapped on their own (freed back to the kernel)
del activation
kept = libc.mallinfo2().fordblks  # free bytes the heap keeps for the next allocation
print(mapped >> 20, kept >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_a_freed_activation_stays_in_the_heap_for_the_next_step() -> None:
    def mib_mapped_and_kept(setting: str) -> tuple[int, int]:
        env = {**os.environ, ENV: setting}
        run = subprocess.run([sys.executable, "-c", HEAP_AFTER_A_STEP], capture_output=True, text=True, env=env,
                             check=True)
        mapped, kept = run.stdout.split()
        return int(mapped), int(kept)

    # glibc's default maps a first 16 MiB block on its own and unmaps it when freed, so the next
    # step faults its pages in again (630-870 faults a step at the char-level shape); with the
    # setting it comes from the heap and stays there (measured: 3 MiB mapped and 16 MiB kept,
    # against 19 and 0).
    mapped, kept = mib_mapped_and_kept("1")
    assert mapped < 16 <= kept
    mapped, kept = mib_mapped_and_kept("0")
    assert mapped >= 16 > kept


def test_the_allocator_setting_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare.txt").is_file(), reason="../shared/data is absent")
def test_the_speed_benchmarks_config_is_nanogpts_char_level_shape(tmp_path: Path) -> None:
    from midus.training.cli import MidusCLI, cli_kwargs

    config = Path(__file__).resolve().parents[1] / "benchmarks" / "shakespeare_char.yaml"
    assert config.read_text().startswith("# python -m midus fit --config benchmarks/shakespeare_char.yaml")
    cli = MidusCLI(args=["--config", str(config), "--data.cache_dir", str(tmp_path),
                         f"--data.files.train=[{SHARED_DATA / 'tinyshakespeare.txt'}]"], run=False, **cli_kwargs())
    model = cli.model.model.config
    assert (model.d_model, model.depth, model.n_heads, model.kv_heads) == (128, 4, 4, 4)
    assert (cli.datamodule.settings["block_size"], cli.datamodule.settings["batch_size"]) == (64, 12)
    assert model.vocab_size == 65 + 2  # the text's 65 characters, end-of-text and unknown
