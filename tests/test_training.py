"""The Lightning layer: loss goes down, parameter groups, schedule, recall probe scoring."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from midus.data.recall_probe import TokenizedQuestion
from midus.model import MidusLM, ModelConfig
from midus.probes import ProbeConfig
from midus.probes.recall import greedy_recall_hits
from midus.training import CausalLM
from midus.training.config import OptimizerConfig, ScheduleConfig
from midus.training.optim import parameter_groups, warmup_cosine


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    options = dict(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    options.update(overrides)
    return ModelConfig(**options)


def quiet_trainer(**overrides) -> pl.Trainer:
    options = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(overrides)
    return pl.Trainer(**options)


def test_loss_goes_down_on_a_short_fit(tiny_data) -> None:
    pl.seed_everything(0)
    module = CausalLM(tiny_config(tiny_data.vocab_size), probes=ProbeConfig(recall_questions=0),
                      optimizer=OptimizerConfig(learning_rate=1e-2), schedule=ScheduleConfig(warmup_steps=5))
    trainer = quiet_trainer(max_steps=60, limit_val_batches=4)
    before = trainer.validate(module, tiny_data, verbose=False)[0]["val/loss"]
    trainer.fit(module, tiny_data)
    after = trainer.validate(module, tiny_data, verbose=False)[0]["val/loss"]
    assert before > math.log(tiny_data.vocab_size) - 0.5  # untrained: about uniform
    assert after < before - 1.5


def test_summary_train_loss_is_the_mean_over_the_last_validation_interval(tiny_data, tmp_path: Path) -> None:
    from midus.training.run_summary import RunSummary

    class StepLosses(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    pl.seed_everything(0)
    module = CausalLM(tiny_config(tiny_data.vocab_size), probes=ProbeConfig(recall_questions=0),
                      optimizer=OptimizerConfig(learning_rate=1e-2), schedule=ScheduleConfig(warmup_steps=2))
    steps, summary = StepLosses(), RunSummary()
    # Validations after steps 4 and 8, and none after the last 2 steps: those must not count.
    trainer = quiet_trainer(max_steps=10, val_check_interval=4, limit_val_batches=2, callbacks=[steps, summary],
                            default_root_dir=tmp_path)  # where the callback writes its summary.json
    trainer.fit(module, tiny_data)
    record = summary.summary(trainer, module, "unused")
    assert len(steps.losses) == 10
    assert record["train"]["loss"] == pytest.approx(sum(steps.losses[4:8]) / 4, rel=1e-6)
    assert record["train"]["loss"] != pytest.approx(sum(steps.losses[:4]) / 4, rel=1e-3)


def test_summary_train_loss_is_the_per_token_loss_whatever_the_accumulation(tiny_data, tmp_path: Path) -> None:
    from midus.training.run_summary import RunSummary

    # A learning rate too small to move the weights: both runs score the same 8 batches with one model.
    losses = {}
    for accumulation in (1, 4):
        pl.seed_everything(0)
        module = CausalLM(tiny_config(tiny_data.vocab_size), probes=ProbeConfig(recall_questions=0),
                          optimizer=OptimizerConfig(learning_rate=1e-12), schedule=ScheduleConfig(warmup_steps=0))
        summary = RunSummary()
        trainer = quiet_trainer(max_steps=8 // accumulation, accumulate_grad_batches=accumulation,
                                val_check_interval=8, limit_val_batches=1, callbacks=[summary],
                                default_root_dir=tmp_path / str(accumulation))
        trainer.fit(module, tiny_data)
        losses[accumulation] = summary.summary(trainer, module, "unused")["train"]["loss"]
        assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(losses[accumulation], abs=0.05)
    assert losses[4] == pytest.approx(losses[1], rel=1e-5)  # not a quarter of it
    assert abs(losses[1] - math.log(tiny_data.vocab_size)) < 0.5  # an untrained model's loss, about log V


def test_a_fit_of_zero_steps_reports_the_starting_model_from_its_full_sanity_pass(tiny_data, tmp_path: Path) -> None:
    from midus.training.run_summary import RunSummary

    # An ablation's un-continued reference arm: trainer.max_steps 0 and a full sanity pass.
    pl.seed_everything(0)
    module = CausalLM(tiny_config(tiny_data.vocab_size), probes=ProbeConfig(recall_questions=0))
    before = [p.detach().clone() for p in module.parameters()]
    summary = RunSummary(latency_prompt_tokens=4, latency_new_tokens=2)
    trainer = quiet_trainer(max_steps=0, num_sanity_val_steps=-1, callbacks=[summary], default_root_dir=tmp_path)
    trainer.fit(module, tiny_data)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))  # nothing trained
    record = json.loads((tmp_path / "summary.json").read_text())
    pl.seed_everything(0)  # the same starting model, validated on its own
    same = CausalLM(tiny_config(tiny_data.vocab_size), probes=ProbeConfig(recall_questions=0))
    expected = quiet_trainer().validate(same, tiny_data, verbose=False)[0]["val/loss"]
    assert record["train"]["steps"] == 0
    assert record["val"]["loss"] == pytest.approx(expected, rel=1e-6)
    assert record["val"]["best_loss"] == pytest.approx(expected, rel=1e-6)
    # A partial sanity pass is not a validation of the model: nothing is reported from it.
    partial = tmp_path / "partial"
    trainer = quiet_trainer(max_steps=0, num_sanity_val_steps=1, callbacks=[RunSummary(latency_prompt_tokens=4,
                            latency_new_tokens=2)], default_root_dir=partial)
    trainer.fit(module, tiny_data)
    assert json.loads((partial / "summary.json").read_text())["val"]["loss"] is None


def test_bf16_mixed_precision_trains_on_cpu(tiny_data) -> None:
    module = CausalLM(tiny_config(tiny_data.vocab_size), probes=ProbeConfig(recall_questions=0))
    initial = module.model.embed.weight.detach().clone()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, precision="bf16-mixed")
    trainer.fit(module, tiny_data)
    assert module.model.embed.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(module.model.embed.weight.detach(), initial)  # and the optimizer updated them
    # 3 steps from a near-uniform start: finite, and about log V (a broken bf16 loss is neither).
    loss = trainer.callback_metrics["train/loss"].item()
    assert math.isfinite(loss) and abs(loss - math.log(tiny_data.vocab_size)) < 0.5


def test_no_weight_decay_on_norms_biases_and_embeddings() -> None:
    model = MidusLM(tiny_config(50, qkv_bias=True, tie_embeddings=True))
    groups = {group["name"]: group for group in parameter_groups(model, weight_decay=0.1)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert all(names[i].endswith("proj.weight") for i in decayed)
    undecayed = [names[id(p)] for p in groups["no_decay"]["params"]]
    assert "embed.weight" in undecayed and "norm.weight" in undecayed and "blocks.0.attn.q_proj.bias" in undecayed
    # Every trainable parameter is in exactly one group; the tied head is not counted twice.
    total = sum(p.numel() for group in groups.values() for p in group["params"])
    assert total == model.num_parameters()


def test_warmup_then_cosine_to_the_floor() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    rates = []
    for _ in range(110):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[0] == 0.0 and rates[5] == pytest.approx(0.5) and rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[60] == pytest.approx(0.55, abs=0.01) and rates[-1] == pytest.approx(0.1, abs=0.01)


class Oracle(torch.nn.Module):
    """Predicts, at every position, the token that follows it in a fixed target sequence."""

    def __init__(self, target: list[int], vocab: int) -> None:
        super().__init__()
        self.target, self.vocab = target, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        for position in range(ids.shape[1]):
            if position + 1 < len(self.target):
                logits[:, position, self.target[position + 1]] = 1.0
        return logits


def test_recall_scoring_on_known_answers() -> None:
    right = TokenizedQuestion(prompt=[0, 5, 6], answer=[7, 8], attribute="city")
    wrong_last = TokenizedQuestion(prompt=[0, 5, 6], answer=[7, 9], attribute="city")
    wrong_first = TokenizedQuestion(prompt=[0, 5, 6], answer=[3, 8], attribute="city")
    hits = greedy_recall_hits(Oracle([0, 5, 6, 7, 8], vocab=10), [right, wrong_last, wrong_first])
    assert hits.tolist() == [True, False, False]


def test_teacher_forced_recall_equals_greedy_generation() -> None:
    torch.manual_seed(0)
    model = MidusLM(tiny_config(20)).eval()
    questions = []
    for length in (3, 5, 4, 6):
        prompt = torch.randint(0, 20, (length,)).tolist()
        greedy = model.generate(torch.tensor([prompt]), 3)[0, length:].tolist()
        questions.append(TokenizedQuestion(prompt, greedy, "a"))  # the model's own greedy answer
        questions.append(TokenizedQuestion(prompt, greedy[:2] + [(greedy[2] + 1) % 20], "a"))
    hits = greedy_recall_hits(model, questions, batch_size=3)  # ragged batches, right padding
    assert hits.tolist() == [True, False] * 4


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_non_finite_loss_naming_the_newest_checkpoint(
    tmp_path: Path, tiny_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from midus.cli import main

    root = Path(__file__).resolve().parents[1]
    args = [
        "fit", "--config", str(root / "experiments" / "quickstart.yaml"),
        "--trainer.max_steps", "40", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.gradient_clip_val", "null",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.optimizer.learning_rate", "1e6", "--model.schedule.warmup_steps", "0",
        "--model.probes.recall_questions", "0",
        "--model.config.d_model", "32", "--model.config.n_layers", "2",
        "--data.embedded.num_people", "20", "--data.embedded.docs_per_person", "3", "--data.bpe_vocab_size", "300",
        "--data.block_size", "32", "--data.batch_size", "8", "--data.cache_dir", str(tiny_cache),
    ]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 3
    message = capsys.readouterr().err.strip().splitlines()[-1]
    match = re.fullmatch(r"error: training diverged: train/loss is (\S+) at step (\d+); the newest good checkpoint is "
                         r"(\S+) \(.*\)", message)
    assert match, message
    assert not math.isfinite(float(match.group(1)))
    step = int(match.group(2))
    assert Path(match.group(3)).is_file() and 2 <= step < 40
    run = tmp_path / "runs" / "quickstart" / "ffn"
    events = EventAccumulator(str(run))
    events.Reload()
    logged = events.Scalars("train/loss")
    # Every logged step before the failing one was finite, and the failing step was never logged.
    assert [event.step for event in logged] == list(range(step)) and all(math.isfinite(e.value) for e in logged)
    assert not (run / "summary.json").exists()


@pytest.mark.slow
def test_fit_resumes_from_last_ckpt_and_train_tokens_continue(tmp_path: Path, tiny_cache: Path) -> None:
    # Before the progress counters were checkpointed, train/tokens restarted at 0 on resume, and
    # once a run had more steps than sequences per batch Lightning's Throughput refused it
    # ("Expected samples (32) to be greater or equal than batches (61)").
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from midus.cli import main

    root = Path(__file__).resolve().parents[1]
    common = [
        "--config", str(root / "experiments" / "quickstart.yaml"),
        "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.probes.recall_questions", "0", "--model.config.d_model", "32", "--model.config.n_layers", "2",
        "--data.embedded.num_people", "20", "--data.embedded.docs_per_person", "3", "--data.bpe_vocab_size", "300",
        "--data.block_size", "32", "--data.batch_size", "8", "--data.cache_dir", str(tiny_cache),
    ]
    run = tmp_path / "runs" / "quickstart" / "ffn"
    main(["fit", *common, "--trainer.max_steps", "6"])
    main(["fit", *common, "--trainer.max_steps", "12", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    events = EventAccumulator(str(run))
    events.Reload()
    tokens = {event.step: event.value for event in events.Scalars("train/tokens")}
    per_step = 8 * 32  # sequences x predicted positions (blocks hold block_size + 1 tokens)
    assert {step: tokens[step] for step in (0, 5, 6, 11)} == {step: (step + 1) * per_step for step in (0, 5, 6, 11)}


@pytest.mark.slow
def test_a_resume_from_an_earlier_checkpoint_replaces_the_steps_logged_after_it(
    tmp_path: Path, tiny_cache: Path
) -> None:
    # A preempted run logged steps 3..5 past its step-3 checkpoint; resuming from that checkpoint
    # logs them again, and TensorBoard must show each step once, with the resumed values.
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from midus.cli import main

    root = Path(__file__).resolve().parents[1]
    common = [
        "--config", str(root / "experiments" / "quickstart.yaml"), "--trainer.num_sanity_val_steps", "0",
        "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.probes.recall_questions", "0", "--model.config.d_model", "32", "--model.config.n_layers", "2",
        "--data.embedded.num_people", "20", "--data.embedded.docs_per_person", "3", "--data.bpe_vocab_size", "300",
        "--data.block_size", "32", "--data.batch_size", "8", "--data.cache_dir", str(tiny_cache),
        "--trainer.max_steps", "6",
    ]
    run = tmp_path / "runs" / "quickstart" / "ffn"
    main(["fit", *common, "--trainer.max_steps", "3"])
    shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "step3.ckpt")
    main(["fit", *common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])  # the run, to step 6
    main(["fit", *common, "--ckpt_path", str(tmp_path / "step3.ckpt")])  # its resume from step 3
    events = EventAccumulator(str(run))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(6))


@pytest.mark.slow
def test_a_run_resumed_from_its_final_checkpoint_summarises_its_last_validation(
    tmp_path: Path, tiny_cache: Path
) -> None:
    # A run stopped after its final checkpoint and resumed with no step left validates nothing, so
    # its summary.json had val.loss null (and an ablation's tuner scored it as failed).
    from midus.cli import main

    root = Path(__file__).resolve().parents[1]
    common = [
        "--config", str(root / "experiments" / "quickstart.yaml"), "--trainer.num_sanity_val_steps", "0",
        "--trainer.val_check_interval", "3", "--trainer.max_steps", "6", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.probes.recall_questions", "4", "--model.config.d_model", "32", "--model.config.n_layers", "2",
        "--data.embedded.num_people", "20", "--data.embedded.docs_per_person", "3", "--data.bpe_vocab_size", "300",
        "--data.block_size", "32", "--data.batch_size", "8", "--data.cache_dir", str(tiny_cache),
    ]
    run = tmp_path / "runs" / "quickstart" / "ffn"
    main(["fit", *common])
    finished = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    main(["fit", *common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["train"]["steps"] == 6 and finished["val"]["loss"] is not None
    assert resumed["val"] == finished["val"]  # loss, best loss and the recall probe's accuracies
