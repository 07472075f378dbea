"""Up-scaling through the Lightning layer: kit checkpoints as bases, reloading without the base."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from midus.checkpoint import load_kit_checkpoint
from midus.model import ModelConfig
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.training.config import OptimizerConfig, ScheduleConfig
from midus.upscale import UpscaleConfig

MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8}


def fit(module: CausalLM, data, steps: int, checkpoint: Path) -> None:
    trainer = pl.Trainer(
        max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(checkpoint)


def test_midus_from_a_kit_checkpoint_trains_only_new_blocks_and_reloads_without_its_base(tiny_data, tmp_path) -> None:
    pl.seed_everything(0)
    config = ModelConfig(vocab_size=tiny_data.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    base_module = CausalLM(config, probes=ProbeConfig(recall_questions=0),
                           optimizer=OptimizerConfig(learning_rate=1e-2), schedule=ScheduleConfig(warmup_steps=2))
    base_path = tmp_path / "base.ckpt"
    fit(base_module, tiny_data, 10, base_path)
    base = load_kit_checkpoint(base_path).eval()
    batch = next(iter(tiny_data.val_dataloader()))["input_ids"][:2, :-1]
    with torch.no_grad():
        torch.testing.assert_close(base(batch), base_module.model.eval()(batch))

    settings = UpscaleConfig(base_checkpoint=str(base_path), method="midus", every=1, memory=MEMORY, trainable="new")
    module = CausalLM(config, upscale=settings, probes=ProbeConfig(recall_questions=0),
                      optimizer=OptimizerConfig(learning_rate=1e-2), schedule=ScheduleConfig(warmup_steps=2))
    assert module.model.config.depth == 4
    # Two memory blocks, each: norm 32 + attention without o_proj (q 32x32, k and v 16x32) and
    # HML+HIVE memory (sub-keys 4·8·8, bank 64·8, projections 4·8·8, rmsnorm query gains 4·8).
    per_block = 32 + 32 * 32 + 2 * 16 * 32 + 4 * 8 * 8 + 8 * 8 * 8 + 4 * 8 * 8 + 4 * 8
    assert module.added_parameters == module.model.num_parameters() - base.num_parameters() == 2 * per_block
    assert module.model.num_parameters(trainable_only=True) == module.added_parameters  # trainable: new
    with torch.no_grad():  # identical function at insertion
        torch.testing.assert_close(module.model.eval()(batch), base(batch), rtol=0, atol=1e-6)
    frozen_before = module.model.blocks[0].attn.q_proj.weight.detach().clone()
    upscaled_path = tmp_path / "upscaled.ckpt"
    fit(module, tiny_data, 6, upscaled_path)
    assert torch.equal(module.model.blocks[0].attn.q_proj.weight, frozen_before)
    assert module.model.blocks[1].branch.values.weight.abs().sum() > 0  # the memory learned

    base_path.unlink()  # the up-scaled checkpoint carries its own architecture
    reloaded = load_kit_checkpoint(upscaled_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), module.model.eval()(batch))
