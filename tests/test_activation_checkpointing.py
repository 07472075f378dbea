"""``model.compute.activation_checkpointing``: each block is recomputed in the backward, the loss and gradients
stay those of the plain step, evaluation is untouched, and FSDP's own checkpointing is never doubled."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from midus.model import MidusLM, ModelConfig
from midus.model.block import TransformerBlock
from midus.model.memory_block import MemoryBlock
from midus.model.memory_config import MemoryConfig
from midus.model.transformer import next_token_loss
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.training.config import ComputeConfig, ScheduleConfig


def _config(vocab_size: int) -> ModelConfig:
    # tests/test_memory_zeroed.py's memory model: HML+HIVE memory blocks at 1 and 3, random values.
    return ModelConfig(
        vocab_size=vocab_size, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, memory_layers=[1, 3],
        memory_branch="hml", memory=MemoryConfig(n_subkeys=16, topk=4, latent_dim=8, zero_init_values=False),
    )


def _step(model: MidusLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = next_token_loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _block_forward_counts(model: MidusLM) -> tuple[list[int], list]:
    counts = [0] * len(model.blocks)

    def counter(index: int):
        def hook(module, args) -> None:
            counts[index] += 1
        return hook

    return counts, [block.register_forward_pre_hook(counter(i)) for i, block in enumerate(model.blocks)]


@pytest.mark.parametrize("autocast", [False, True])
def test_checkpointing_gives_the_same_loss_and_gradients_and_recomputes_every_block(autocast: bool) -> None:
    torch.manual_seed(0)
    plain = MidusLM(_config(50))
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    assert [type(b) for b in plain.blocks] == [TransformerBlock, MemoryBlock, TransformerBlock, MemoryBlock]
    ids = torch.randint(0, 50, (3, 17), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, checkpointed):
        counts, hooks = _block_forward_counts(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = next_token_loss(model(ids[:, :-1]), ids[:, 1:])
        forward_counts = list(counts)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
        assert forward_counts == [1, 1, 1, 1]
        # Checkpointed, the backward runs each block's forward again: twice per block in a training step.
        assert counts == ([2, 2, 2, 2] if model is checkpointed else [1, 1, 1, 1])
        for hook in hooks:
            hook.remove()
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and any("branch.values" in name for name in grads)
    for name, expected in grads.items():
        torch.testing.assert_close(grads_ckpt[name], expected, rtol=1e-6, atol=1e-6, msg=name)


def test_evaluation_and_generation_run_each_block_once_with_checkpointing_on() -> None:
    torch.manual_seed(0)
    model = MidusLM(_config(50))
    model.activation_checkpointing = True
    ids = torch.randint(0, 50, (2, 9))
    counts, hooks = _block_forward_counts(model)
    with torch.no_grad():  # validation, probes: no backward to recompute for
        logits = model(ids)
    assert counts == [1, 1, 1, 1]
    model.eval()  # eval mode with gradients (analyses that differentiate the loss)
    counts[:] = [0] * 4
    next_token_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    assert counts == [1, 1, 1, 1]
    generated = model.generate(ids[:, :3], max_new_tokens=2)  # the KV cache path
    for hook in hooks:
        hook.remove()
    model.activation_checkpointing = False
    with torch.no_grad():
        torch.testing.assert_close(model(ids), logits, rtol=0, atol=0)
    assert torch.equal(model.generate(ids[:, :3], max_new_tokens=2), generated)


def _fit(data, checkpointing: bool, chunk: int) -> tuple[CausalLM, dict[str, float]]:
    torch.manual_seed(0)
    module = CausalLM(_config(data.vocab_size), probes=ProbeConfig(recall_questions=8),
                      compute=ComputeConfig(activation_checkpointing=checkpointing, loss_chunk_tokens=chunk),
                      schedule=ScheduleConfig(warmup_steps=2))
    trainer = pl.Trainer(
        max_steps=4, gradient_clip_val=0.5, val_check_interval=4, limit_val_batches=2, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return module, {name: float(value) for name, value in trainer.callback_metrics.items()}


def test_a_clipped_fit_with_checkpointing_and_the_chunked_loss_trains_as_the_plain_one(tiny_data) -> None:
    plain, plain_metrics = _fit(tiny_data, False, 0)
    module, metrics = _fit(tiny_data, True, 64)
    assert module.model.activation_checkpointing and module.global_step == 4
    # The validation probes (recall, memory zeroed, slot usage) ran, in eval mode, on the checkpointed model.
    assert "val/recall_acc" in metrics and "memory/zeroed/loss_delta" in metrics
    assert metrics.keys() == plain_metrics.keys()
    for name, value in plain_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    for (name, expected), got in zip(plain.model.named_parameters(), module.model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def _under_fsdp(module: CausalLM, policy: set[type] | None, fitting: bool = True) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.trainer.states import TrainerFn

    strategy = FSDPStrategy(auto_wrap_policy={TransformerBlock, MemoryBlock}, activation_checkpointing_policy=policy)
    state = SimpleNamespace(fn=TrainerFn.FITTING if fitting else TrainerFn.VALIDATING)
    module._trainer = SimpleNamespace(strategy=strategy, state=state)  # what configure_model reads
    module.configure_model()


def test_under_fsdp_the_strategys_checkpointing_policy_wins_and_the_model_never_wraps_again() -> None:
    config = _config(50)
    with_policy = CausalLM(config, compute=ComputeConfig(activation_checkpointing=True))
    _under_fsdp(with_policy, {TransformerBlock, MemoryBlock})
    assert not with_policy.model.activation_checkpointing  # the strategy's wrappers recompute; not twice
    without_policy = CausalLM(config, compute=ComputeConfig(activation_checkpointing=True))
    with pytest.raises(ValueError, match=r"model\.compute\.activation_checkpointing=true under FSDPStrategy.*"
                                         r"trainer\.strategy\.init_args\.activation_checkpointing_policy"):
        _under_fsdp(without_policy, None)
    evaluating = CausalLM(config, compute=ComputeConfig(activation_checkpointing=True))
    _under_fsdp(evaluating, None, fitting=False)  # validate/test: nothing to checkpoint, nothing to refuse
    assert not evaluating.model.activation_checkpointing
