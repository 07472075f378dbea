"""Mixed precision really computes in bfloat16; batched generation with an end token keeps rows apart."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from midus.model import MidusLM, ModelConfig
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.training.config import ScheduleConfig

VOCAB = 50


# ---- precision: what dtype the model's matmuls actually run in under the Trainer ----


@pytest.mark.parametrize(("precision", "expected"), [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_trainer_precision_sets_the_dtype_of_the_forward(tiny_data, precision: str, expected: torch.dtype) -> None:
    pl.seed_everything(0)
    config = ModelConfig(vocab_size=tiny_data.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    module = CausalLM(config, probes=ProbeConfig(recall_questions=0), schedule=ScheduleConfig(warmup_steps=1))
    seen: dict[str, set[torch.dtype]] = {}

    def record(name: str):
        def hook(_module, _inputs, output) -> None:
            phase = "train" if module.training else "eval"
            seen.setdefault(f"{phase}:{name}", set()).add(output.dtype)
        return hook

    handles = [
        module.model.blocks[0].attn.q_proj.register_forward_hook(record("q_proj")),
        module.model.blocks[1].branch.register_forward_hook(record("branch")),
        module.model.lm_head.register_forward_hook(record("lm_head")),
    ]
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2, precision=precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    try:
        trainer.fit(module, tiny_data)
    finally:
        for handle in handles:
            handle.remove()
    # Training steps and the validation at step 2 both ran, every observed output in `expected`.
    names = {f"{phase}:{name}" for phase in ("train", "eval") for name in ("q_proj", "branch", "lm_head")}
    assert set(seen) == names
    assert all(dtypes == {expected} for dtypes in seen.values()), seen
    # Master weights stay float32 either way, and the loss is finite.
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


# ---- batched generation with eos_token_id ----


def tiny_model(seed: int = 0) -> MidusLM:
    """A 2-layer random model, eval mode; init_std is raised so logits are far from ties."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2)
    return MidusLM(config).eval()


def prompts(count: int, time: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, time), generator=torch.Generator().manual_seed(seed))


STEPS = 10


def greedy_rows(model: MidusLM, ids: torch.Tensor) -> list[list[int]]:
    """Each prompt's greedy continuation of STEPS tokens, generated one row at a time, no eos."""
    return [model.generate(row[None], STEPS)[0, ids.shape[1]:].tolist() for row in ids]


def with_eos(tokens: list[int], eos: int) -> list[int]:
    """What a row must show with `eos`: its own greedy tokens up to the first eos, then eos only."""
    if eos not in tokens:
        return tokens
    first = tokens.index(eos)
    return tokens[: first + 1] + [eos] * (len(tokens) - first - 1)


def test_finished_rows_repeat_eos_while_the_others_continue_their_own_greedy_tokens() -> None:
    model = tiny_model()
    ids = prompts(8)
    rows = greedy_rows(model, ids)
    # eos: a token row a emits at step 0; row b must emit it never, row c first after a few steps. Rows a
    # and c must greedily go on with other tokens after it, so that repeating eos is visible in them.
    def fits(a: int, b: int, c: int) -> bool:
        eos = rows[a][0]
        return (
            len({a, b, c}) == 3 and eos not in rows[b] and eos in rows[c][2:] and eos not in rows[c][:2]
            and rows[a] != with_eos(rows[a], eos) and rows[c] != with_eos(rows[c], eos)
        )

    cases = [(a, b, c) for a in range(len(rows)) for b in range(len(rows)) for c in range(len(rows)) if fits(a, b, c)]
    assert cases, f"no prompt set fits the test; greedy rows: {rows}"
    a, b, c = cases[0]
    eos = rows[a][0]
    batch = ids[[a, b, c]]

    out = model.generate(batch, STEPS, eos_token_id=eos)
    assert out.shape == (3, ids.shape[1] + STEPS)  # row b never finishes: no early stop
    assert torch.equal(out[:, : ids.shape[1]], batch)  # prompts kept
    new = out[:, ids.shape[1]:].tolist()
    assert new[0] == [eos] * STEPS  # finished at step 0, then eos at every later position
    assert new[1] == rows[b]  # unfinished: exactly its single-row greedy tokens
    assert new[2] == with_eos(rows[c], eos)  # finished later: its own tokens, then eos


def test_generation_stops_early_only_once_every_row_has_finished() -> None:
    model = tiny_model()
    ids = prompts(8)
    rows = greedy_rows(model, ids)
    # Row a finishes at step 0, row b at step `late` (1 <= late < STEPS - 1): the batch stops after late + 1.
    cases = [
        (a, b, rows[b].index(rows[a][0])) for a in range(len(rows)) for b in range(len(rows))
        if a != b and rows[a][0] in rows[b][1 : STEPS - 1]
    ]
    assert cases, f"no prompt set fits the test; greedy rows: {rows}"
    a, b, late = cases[0]
    eos = rows[a][0]

    out = model.generate(ids[[a, b]], STEPS, eos_token_id=eos)
    assert out.shape == (2, ids.shape[1] + late + 1)  # not at a's eos (b still running), right after b's
    new = out[:, ids.shape[1]:].tolist()
    assert new[0] == [eos] * (late + 1)
    assert new[1] == rows[b][: late + 1] and new[1][-1] == eos
    # The order of rows does not matter, and each row alone stops at its own eos.
    swapped = model.generate(ids[[b, a]], STEPS, eos_token_id=eos)
    assert torch.equal(swapped, out[[1, 0]])
    alone = model.generate(ids[[b]], STEPS, eos_token_id=eos)
    assert torch.equal(alone, out[[1]])
