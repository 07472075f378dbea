"""`midus.training.memory_estimate`: the weights, gradients and AdamW state it counts are the tensors a
step allocates, its activation term follows PyTorch's own memory tracker, and ``fit`` logs it."""

from __future__ import annotations

import contextlib
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from midus.model import MidusLM, ModelConfig
from midus.model.memory_config import MemoryConfig
from midus.model.transformer import next_token_loss
from midus.training import CausalLM
from midus.training.config import ComputeConfig
from midus.training.memory_estimate import estimate_training_memory
from midus.training.optim import parameter_groups


def _memory_config(vocab: int = 512, tied: bool = True) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=192, memory_layers=[1, 3],
        memory=MemoryConfig(n_subkeys=16, topk=4, latent_dim=8, zero_init_values=False), tie_embeddings=tied,
    )


@pytest.mark.parametrize(("precision", "autocast"), [("32-true", False), ("bf16-mixed", True)])
def test_weights_gradients_and_adamw_state_are_the_bytes_a_step_allocates(precision: str, autocast: bool) -> None:
    torch.manual_seed(0)
    model = MidusLM(_memory_config())
    for parameter in model.blocks[0].parameters():  # a frozen part: no gradient, no AdamW state
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3)
    ids = torch.randint(0, 512, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = next_token_loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    optimizer.step()
    estimate = estimate_training_memory(
        model.config, model.num_parameters(trainable_only=True), 2, 16, precision
    )
    parameters = list(model.parameters())  # a tied matrix once
    assert model.lm_head.weight is model.embed.weight
    assert estimate.weights == sum(p.nbytes for p in parameters)
    assert estimate.gradients == sum(p.grad.nbytes for p in parameters if p.grad is not None)
    moments = [state[name] for state in optimizer.state.values() for name in ("exp_avg", "exp_avg_sq")]
    assert estimate.optimizer == sum(moment.nbytes for moment in moments)
    assert estimate.gradients < estimate.weights  # the frozen block is in the weights only
    # Counted from the config (meta device) when not given.
    assert estimate_training_memory(model.config, 0, 1, 1).weights == 4 * model.num_parameters()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize(("checkpointing", "chunk"), [(False, 0), (True, 0), (False, 16), (True, 16)])
def test_activations_grow_linearly_with_the_batch_and_drop_with_checkpointing(
    precision: str, checkpointing: bool, chunk: int
) -> None:
    config = _memory_config(vocab=512)

    def activations(batch: int, **changes) -> int:
        settings = {"checkpointing": checkpointing, "chunk": chunk, **changes}
        return estimate_training_memory(
            config, 1, batch, 64, precision, settings["checkpointing"], settings["chunk"]
        ).activations

    # (Batches large enough that the peak stays in one phase: the maximum over phases is piecewise linear.)
    one, two, three = activations(4), activations(8), activations(12)
    assert 0 < one < two < three and three - two == two - one
    if not checkpointing:
        # Less in all, and less per added sequence (each block keeps only its input).
        assert activations(8, checkpointing=True) < two
        assert activations(12, checkpointing=True) - activations(8, checkpointing=True) < (three - two) / 2
    if not chunk:
        assert activations(8, chunk=16) < two


def _tracked_peak(config: ModelConfig, batch: int, block: int, autocast: bool, checkpointing: bool, chunk: int):
    """PyTorch's memory tracker over one forward (under autocast, as Lightning runs it) and backward:
    (peak bytes beyond the inputs, of which gradients, of which activations and temporaries)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = MidusLM(config)
    model.activation_checkpointing = checkpointing
    ids = torch.randint(0, config.vocab_size, (batch, block + 1))
    tracker = MemTracker()
    tracker.track_external(model, ids)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            inputs, targets = ids[:, :-1], ids[:, 1:]
            loss = model(inputs, targets=targets, loss_chunk_tokens=chunk) if chunk else next_token_loss(
                model(inputs), targets
            )
        loss.backward()
    peak = {str(getattr(key, "value", key)): value for key, value in tracker.get_tracker_snapshot("peak")[
        torch.device("cpu")].items()}
    total = peak["Parameter"] + peak.get("Gradient", 0) + peak.get("Activation", 0) + peak.get("Temp", 0)
    return total, peak.get("Gradient", 0), peak.get("Activation", 0) + peak.get("Temp", 0)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize(("checkpointing", "chunk"), [(False, 0), (True, 0), (False, 128), (True, 128)])
@pytest.mark.parametrize("branches", ["llama", "midus", "midus_p4"])
def test_the_estimate_follows_pytorchs_memory_tracker(branches: str, checkpointing: bool, chunk: int,
                                                      autocast: bool) -> None:
    config = ModelConfig(vocab_size=2048, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=384)
    if branches.startswith("midus"):
        # midus_p4: four sub-spaces of the 32-wide heads (4096 slots), four shortlists of indices kept.
        sizes = {"n_subkeys": 8, "n_subspaces": 4} if branches == "midus_p4" else {"n_subkeys": 32}
        config = ModelConfig(
            vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=384, memory_layers=[1, 3],
            memory=MemoryConfig(topk=8, latent_dim=16, zero_init_values=False, **sizes), tie_embeddings=True,
        )
    batch, block = 4, 128
    total, gradients, activations = _tracked_peak(config, batch, block, autocast, checkpointing, chunk)
    parameters = sum(p.numel() for p in MidusLM(config).parameters())
    estimate = estimate_training_memory(
        config, parameters, batch, block, "bf16-mixed" if autocast else "32-true", checkpointing, chunk
    )
    if not gradients:
        # The peak came before any gradient existed (the loss's backward): the activation term is exact
        # up to the few small tensors it leaves out (ids, scalars).
        assert estimate.activations == pytest.approx(activations, rel=0.01)
    # Always an upper bound, loose by the gradients it counts whole.
    bound = estimate.weights + estimate.gradients + estimate.activations
    assert total <= bound <= 1.3 * total


def test_an_unknown_precision_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"trainer\.precision='transformer-engine': the memory estimate knows 32-true"):
        estimate_training_memory(_memory_config(), 1, 1, 8, "transformer-engine")


def test_fit_logs_the_estimate_and_records_it_as_hyperparameters(tiny_data, tmp_path) -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.INFO)
    kit_logger = logging.getLogger("midus.training.memory_estimate")
    kit_logger.addHandler(handler)
    previous = kit_logger.level
    kit_logger.setLevel(logging.INFO)
    try:
        torch.manual_seed(0)
        module = CausalLM(_memory_config(tiny_data.vocab_size),
                          compute=ComputeConfig(activation_checkpointing=True, loss_chunk_tokens=64))
        trainer = pl.Trainer(
            max_steps=1, limit_val_batches=0, logger=CSVLogger(tmp_path, name="run", version="v"),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, datamodule=tiny_data)
    finally:
        kit_logger.removeHandler(handler)
        kit_logger.setLevel(previous)
    expected = estimate_training_memory(
        module.model.config, module.model.num_parameters(trainable_only=True), 8, 32, "32-true", True, 64
    ).gib()
    (line,) = [record.getMessage() for record in records if record.getMessage().startswith("memory estimate")]
    assert (f"weights {expected['weights']:.2f} + gradients {expected['gradients']:.2f} + AdamW "
            f"{expected['optimizer']:.2f} + activations {expected['activations']:.2f}") in line
    assert "micro-batch 8 x 32, 32-true, activation checkpointing on, loss chunk 64" in line
    assert line.endswith(f"at most {expected['total']:.2f}")
    hparams = (tmp_path / "run" / "v" / "hparams.yaml").read_text()
    assert f"memory_estimate_gib/total: {expected['total']}" in hparams
