"""``model.compute.loss_chunk_tokens``: the chunked next-token loss equals the full-logit loss and its gradients,
and never holds full-vocabulary float32 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from midus.model import MidusLM, ModelConfig
from midus.model.chunked_loss import chunked_next_token_loss
from midus.model.memory_config import MemoryConfig
from midus.model.transformer import next_token_loss
from midus.training import CausalLM
from midus.training.config import ComputeConfig

TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def _inputs(tokens: tuple[int, int], width: int, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tokens, width, generator=generator, requires_grad=True)
    weight = (torch.randn(vocab, width, generator=generator) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, tokens, generator=generator)
    return hidden, weight, targets


def _loss_and_grads(loss_fn, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    hidden.grad = weight.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


# 2 x 13 = 26 tokens: chunks of 1, 5 (last one of 1), 7 (last of 5), exactly 26, and more than there are.
@pytest.mark.parametrize("chunk", [1, 5, 7, 26, 100])
def test_the_chunked_loss_and_its_gradients_equal_the_full_logit_loss(chunk: int) -> None:
    hidden, weight, targets = _inputs((2, 13), 16, 37)
    full = _loss_and_grads(lambda: F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten()),
                           hidden, weight)
    chunked = _loss_and_grads(lambda: chunked_next_token_loss(hidden, weight, targets, chunk), hidden, weight)
    assert chunked[0].dtype == torch.float32
    for expected, got in zip(full, chunked):
        torch.testing.assert_close(got, expected, **TOLERANCE)


def test_ignored_targets_are_neither_scored_nor_counted_as_in_cross_entropy() -> None:
    hidden, weight, targets = _inputs((3, 11), 16, 29, seed=1)
    targets[0, :4] = -100  # e.g. padding
    targets[2, -1] = -100
    full = _loss_and_grads(lambda: F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten()),
                           hidden, weight)
    chunked = _loss_and_grads(lambda: chunked_next_token_loss(hidden, weight, targets, 4), hidden, weight)
    for expected, got in zip(full, chunked):
        torch.testing.assert_close(got, expected, **TOLERANCE)
    assert not hidden.grad[0, :4].any()  # ignored positions get no gradient


def _memory_model(vocab: int, tied: bool) -> MidusLM:
    torch.manual_seed(0)
    return MidusLM(ModelConfig(
        vocab_size=vocab, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, memory_layers=[1, 3], memory_branch="hml",
        memory=MemoryConfig(n_subkeys=16, topk=4, latent_dim=8, zero_init_values=False), tie_embeddings=tied,
    ))


@pytest.mark.parametrize("tied", [True, False])
def test_the_models_chunked_loss_gives_every_parameter_the_full_losss_gradient(tied: bool) -> None:
    model = _memory_model(61, tied)
    assert (model.lm_head.weight is model.embed.weight) == tied
    ids = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(3))
    inputs, targets = ids[:, :-1], ids[:, 1:]  # 27 tokens: chunks of 8, the last of 3

    def run(compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    full_loss, full_grads = run(lambda: next_token_loss(model(inputs), targets))
    chunked_loss, chunked_grads = run(lambda: model(inputs, targets=targets, loss_chunk_tokens=8))
    torch.testing.assert_close(chunked_loss, full_loss, **TOLERANCE)
    # Tied, the head's gradient and the embedding's meet in one tensor (named once: embed.weight).
    assert chunked_grads.keys() == full_grads.keys() and ("lm_head.weight" in full_grads) != tied
    for name, expected in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], expected, **TOLERANCE, msg=name)
    # With targets and chunk 0 the forward returns the full-logit loss itself.
    torch.testing.assert_close(model(inputs, targets=targets), full_loss, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs, targets=targets, loss_chunk_tokens=8), full_loss, **TOLERANCE)


def test_the_chunked_loss_never_holds_full_vocabulary_float32_logits() -> None:
    from torch.distributed._tools.mem_tracker import MemTracker

    tokens, vocab, chunk = (4, 64), 2048, 16
    hidden, weight, targets = _inputs(tokens, 32, vocab)
    full_logits = tokens[0] * tokens[1] * vocab * 4  # bytes of one float32 (tokens, vocab) tensor

    def peak(loss_fn) -> int:
        tracker = MemTracker()
        tracker.track_external(hidden, weight, targets)
        with tracker:
            loss_fn().backward()
        snapshot = tracker.get_tracker_snapshot("peak")[hidden.device]
        # Everything the loss allocated at its peak, beyond the inputs and their gradients.
        kinds = ("Activation", "Temp")
        return sum(value for key, value in snapshot.items() if str(getattr(key, "value", key)) in kinds)

    assert peak(lambda: next_token_loss(F.linear(hidden, weight), targets)) >= 3 * full_logits
    chunked = peak(lambda: chunked_next_token_loss(hidden, weight, targets, chunk))
    # At most a chunk's (chunk, vocab) float32 tensors and three head-sized gradients (the chunk's, the
    # running sum, the new sum): here less than half of one full-vocabulary float32 logit tensor.
    assert chunked < full_logits / 2


def test_causal_lm_trains_on_the_chunked_loss_and_refuses_a_negative_chunk() -> None:
    config = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)
    torch.manual_seed(0)
    full = CausalLM(config)
    torch.manual_seed(0)
    chunked = CausalLM(config, compute=ComputeConfig(loss_chunk_tokens=5))
    batch = {"input_ids": torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))}
    losses = []
    for module in (full, chunked):
        loss, _, _ = module.next_token_loss(batch)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **TOLERANCE)
    for (name, expected), got in zip(full.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, **TOLERANCE, msg=name)
    with pytest.raises(ValueError, match=r"model\.compute\.loss_chunk_tokens must be 0 \(full logits\) or a positive"):
        CausalLM(config, compute=ComputeConfig(loss_chunk_tokens=-1))
    hidden, weight, targets = _inputs((1, 4), 8, 5)
    with pytest.raises(ValueError, match="loss_chunk_tokens must be positive"):
        chunked_next_token_loss(hidden, weight, targets, 0)
