"""The lm-evaluation-harness adapter: a kit checkpoint scores a local multiple-choice task.

The task (tests/data/lm_eval_task) asks which run of the alphabet continues "mnop"; a tiny
model trained by a real ``fit`` on alphabet runs knows, a random-init one of the same shape
does not. Everything runs offline: the task is a local YAML and JSON-lines file.
"""

from __future__ import annotations

import importlib
import json
import random
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from midus.cli import main

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "lm_eval_task"
TASK = "midus_letter_successor"
LETTERS = "abcdefghijklmnopqrstuvwxyz"

needs_lm_eval = pytest.mark.skipif(find_spec("lm_eval") is None, reason='needs pip install "midus[eval]"')


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub; the task's relative data_files resolve from the repository root, as documented;
    no environment report in the harness's results."""
    import datasets.config

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.chdir(ROOT)
    if find_spec("lm_eval") is not None:
        import lm_eval.evaluator

        # Every simple_evaluate records torch's environment report, which runs `pip list` and
        # friends in subprocesses (~3 s); it says nothing about the adapter.
        monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``fit`` (char tokenizer, stored in the checkpoint) on runs of the alphabet ("klmnop…");
    60 steps make the successor of every letter certain (measured: acc 1.0 for 4 data seeds)."""
    folder = tmp_path_factory.mktemp("alphabet_run")
    rng = random.Random(0)
    lines = [
        "".join(LETTERS[(start + i) % 26] for i in range(12 + rng.randrange(12)))
        for start in (rng.randrange(26) for _ in range(300))
    ]
    (folder / "alphabet.txt").write_text("\n".join(lines) + "\n")
    main([
        "fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"),
        "--trainer.max_steps", "60", "--trainer.val_check_interval", "60",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "50",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(folder / "runs"),
        "--model.optimizer.learning_rate", "0.01", "--model.schedule.warmup_steps", "5",
        "--model.probes.recall_questions", "0",
        "--model.config.d_model", "32", "--model.config.n_layers", "2",
        "--model.config.n_heads", "2", "--model.config.n_kv_heads", "2",
        "--data.source", "files", "--data.files.train", f"[{folder / 'alphabet.txt'}]",
        "--data.files.sample_by", "line", "--data.tokenizer", "char",
        "--data.block_size", "32", "--data.batch_size", "16", "--data.cache_dir", str(folder / "cache"),
    ])
    (checkpoint,) = folder.glob("runs/*/*/checkpoints/last.ckpt")
    return checkpoint


def untrained_copy(checkpoint: Path, folder: Path, keep_tokenizer: bool = True) -> Path:
    """The checkpoint with random-init weights of the same architecture (and tokenizer)."""
    from midus.checkpoint.kit import MODEL_CONFIG_KEY, TOKENIZER_KEY
    from midus.model import MidusLM, ModelConfig

    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)
    torch.manual_seed(0)
    fresh = MidusLM(ModelConfig(**stored[MODEL_CONFIG_KEY]))
    stored["state_dict"] = {f"model.{name}": value for name, value in fresh.state_dict().items()}
    if not keep_tokenizer:
        del stored[TOKENIZER_KEY]
    path = folder / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(stored, path)
    return path


def accuracy(results_path: Path) -> float:
    return json.loads(results_path.read_text())["results"][TASK]["acc,none"]


@needs_lm_eval
@pytest.mark.slow
def test_trained_model_scores_the_local_task_well_above_chance_and_untrained_does_not(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    main(["lm-eval", "--ckpt_path", str(trained_checkpoint), "--include_path", str(TASK_DIR), "--tasks", TASK])
    # Default output: <run dir>/lm_eval/results.json, the run dir being the folder above checkpoints/.
    trained = accuracy(trained_checkpoint.parents[1] / "lm_eval" / "results.json")
    assert TASK in capsys.readouterr().out  # the harness's table

    untrained_path = untrained_copy(trained_checkpoint, tmp_path / "untrained")
    main(["lm-eval", "--ckpt_path", str(untrained_path), "--include_path", str(TASK_DIR), "--tasks", TASK,
          "--batch_size", "3", "--output_path", str(tmp_path / "untrained.json")])
    untrained = accuracy(tmp_path / "untrained.json")
    print(f"\nacc trained {trained:.3f}, untrained {untrained:.3f} (chance 0.25, 24 documents)")
    assert trained >= 0.8
    assert untrained <= 0.5 and trained - untrained >= 0.4


@needs_lm_eval
@pytest.mark.slow
def test_harness_builds_the_model_by_name_and_it_generates_until_a_stop_string(trained_checkpoint: Path) -> None:
    import lm_eval
    from lm_eval.api.registry import get_model, model_registry
    from lm_eval.tasks import TaskManager

    from midus.evaluation.lm_eval_adapter import MidusEvalLM

    assert get_model("midus") is MidusEvalLM and "hf" in model_registry  # built-ins still listed
    results = lm_eval.simple_evaluate(
        model="midus", model_args=f"checkpoint={trained_checkpoint},batch_size=4", tasks=[TASK], limit=8,
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False), log_samples=False,
    )
    assert results["results"][TASK]["acc,none"] >= 0.75
    assert results["config"]["max_length"] == 32  # the block size the checkpoint was trained on

    lm = MidusEvalLM(checkpoint=str(trained_checkpoint))
    requests = [("klm", {"until": ["r"], "max_gen_toks": 20}), ("klm", {"until": ["\n"], "max_gen_toks": 3})]
    assert lm.generate_until([SimpleNamespace(args=args) for args in requests]) == ["nopq", "nop"]


def direct_loglikelihood(model, tokenizer, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    """log p(continuation | context) straight from the logits, with the harness's split rule:
    trailing spaces of the context move to the continuation, and the continuation is what
    tokenising the whole text adds after the context's tokens."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if context:
        stripped = context.rstrip()
        context_ids = encode(stripped)
        continuation_ids = encode(stripped + context[len(stripped):] + continuation)[len(context_ids):]
    else:
        context_ids, continuation_ids = [tokenizer.eos_token_id], encode(continuation)
    ids = (context_ids + continuation_ids)[-(max_length + 1):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], dim=-1)
    scored = logprobs[len(ids) - 1 - len(continuation_ids):]
    targets = torch.tensor(continuation_ids)
    return scored.gather(1, targets[:, None]).sum().item(), bool((scored.argmax(-1) == targets).all())


@needs_lm_eval
def test_loglikelihood_and_rolling_match_a_direct_computation() -> None:
    from midus.data.tokenizers import train_bpe
    from midus.evaluation.lm_eval_adapter import MidusEvalLM
    from midus.model import MidusLM, ModelConfig

    text = ["I saw the cat sat on the mat and the dog saw the cat"] * 20
    tokenizer = train_bpe([text], 300)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # The boundary matters: "I saw " + "the cat" tokenises differently from "I saw the cat".
    assert encode("I saw ") + encode("the cat") != encode("I saw the cat")
    torch.manual_seed(0)
    model = MidusLM(ModelConfig(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    lm = MidusEvalLM(model=model, tokenizer=tokenizer, batch_size=3, max_length=8)
    pairs = [
        ("I saw the", " cat"), ("I saw ", "the cat sat"), ("", "the dog"),
        ("the cat sat on the mat and the dog saw the cat sat on", " the mat"),  # left-truncated to 8 tokens
        ("dog", " saw"),
    ]
    got = lm.loglikelihood([SimpleNamespace(args=pair) for pair in pairs])
    for pair, (logprob, greedy) in zip(pairs, got):
        expected, expected_greedy = direct_loglikelihood(model, tokenizer, *pair, max_length=8)
        assert logprob == pytest.approx(expected, abs=1e-4), pair
        assert greedy == expected_greedy

    # Rolling log-likelihood of a text that fits: every token given what precedes it, after eos.
    (rolling,) = MidusEvalLM(model=model, tokenizer=tokenizer, max_length=64).loglikelihood_rolling(
        [SimpleNamespace(args=("the cat sat on the mat",))])
    ids = [tokenizer.eos_token_id] + encode("the cat sat on the mat")
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
    assert rolling == pytest.approx(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum().item(), abs=1e-4)


@needs_lm_eval
def test_a_task_yaml_that_does_not_parse_is_one_error_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, tasks)
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: json\n  doc_to_text: [unclosed\n")
    output = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_:
        # The checkpoint does not exist: the task files are checked first.
        main(["lm-eval", "--ckpt_path", str(tmp_path / "none.ckpt"), "--include_path", str(tasks),
              "--tasks", TASK, "--output_path", str(output)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and len(error.splitlines()) == 1
    assert str(tasks / "broken.yaml") in error and "line 3" in error
    assert not output.exists()


@needs_lm_eval
@pytest.mark.parametrize("data, message", [
    ('{"context": "a b", "choices": ["c d", "x y"], "label": 0}\n{"context": "b c", "choi\n', "line 2 does not parse"),
    (None, "not found"),
])
def test_a_data_file_that_does_not_parse_or_exist_is_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, data: str | None, message: str
) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data_file = tmp_path / "data.jsonl"
    if data is not None:
        data_file.write_text(data)
    task_yaml = (TASK_DIR / f"{TASK.removeprefix('midus_')}.yaml").read_text()
    shipped_data = "tests/data/lm_eval_task/letter_successor.jsonl"
    (tasks / "task.yaml").write_text(task_yaml.replace(shipped_data, str(data_file)))
    with pytest.raises(SystemExit) as exit_:
        main(["lm-eval", "--ckpt_path", str(tmp_path / "none.ckpt"), "--include_path", str(tasks), "--tasks", TASK])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and str(data_file) in error and message in error and TASK in error


@needs_lm_eval
def test_an_unknown_task_lists_what_the_include_path_provides(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import lm_eval.tasks

    # The real command also indexes the harness's ~15,000 task files (~15 s) before it can say
    # a name is unknown; that part is the harness's, so it is left out here.
    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: real(**{**kwargs, "include_defaults": False}))
    with pytest.raises(SystemExit) as exit_:
        main(
            ["lm-eval", "--ckpt_path", "none.ckpt", "--include_path", str(TASK_DIR), "--tasks", f"{TASK},no_such_task"]
        )
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "unknown task(s) no_such_task" in error and f"provide: {TASK}" in error


@needs_lm_eval
def test_a_hub_task_offline_is_one_error_naming_the_task_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """arc_easy with HF_DATASETS_OFFLINE=1 and an empty datasets cache (the `offline` fixture):
    ``datasets`` raises ConnectionError without touching the network; the command says what to do."""
    import lm_eval.tasks

    # Only the harness's arc YAMLs are indexed (the real arc_easy task), not all ~15,000 (~15 s).
    arc = Path(lm_eval.tasks.__file__).parent / "arc"
    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(
        lm_eval.tasks, "TaskManager", lambda **kwargs: real(**{**kwargs, "include_path": str(arc),
                                                              "include_defaults": False})
    )
    from midus.checkpoint.kit import kit_entries
    from midus.evaluation import lm_eval_adapter
    from midus.model import MidusLM, ModelConfig

    checkpoint = tmp_path / "tiny.ckpt"  # a valid checkpoint whose model must never be built
    model = MidusLM(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1))
    torch.save({**kit_entries(model.config, None), "state_dict": {}}, checkpoint)

    def no_model(**kwargs):
        raise AssertionError("the model was loaded before the task's dataset")

    monkeypatch.setattr(lm_eval_adapter, "MidusEvalLM", no_model)
    output = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_:
        main(["lm-eval", "--ckpt_path", str(checkpoint), "--tasks", "arc_easy", "--output_path", str(output)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --tasks: arc_easy needs its dataset from the Hugging Face hub")
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    assert "run once with network" in error and "HF_DATASETS_OFFLINE=1" in error and "allenai/ai2_arc" in error
    assert not output.exists()


@needs_lm_eval
@pytest.mark.slow
def test_an_old_checkpoint_needs_its_tokenizer_directory(trained_checkpoint: Path, tmp_path: Path) -> None:
    from midus.checkpoint.kit import checkpoint_tokenizer, read_kit_checkpoint
    from midus.evaluation.lm_eval_adapter import MidusEvalLM

    old = untrained_copy(trained_checkpoint, tmp_path / "old", keep_tokenizer=False)
    with pytest.raises(ValueError, match="stores no tokenizer.*tokenizer=<dir>"):
        MidusEvalLM(checkpoint=str(old))
    stored = checkpoint_tokenizer(read_kit_checkpoint(trained_checkpoint))
    stored.save_pretrained(str(tmp_path / "tokenizer"))
    lm = MidusEvalLM(checkpoint=str(old), tokenizer=str(tmp_path / "tokenizer"))
    assert lm.tok_encode("klm") == stored("klm")["input_ids"] and len(lm.tok_encode("klm")) == 3


def test_without_the_harness_the_command_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    if find_spec("lm_eval") is not None:
        # Imported for real first: an import under the patch below would cache the adapter's
        # fallback (no harness) for the rest of the session.
        importlib.import_module("midus.evaluation.lm_eval_adapter")
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)  # what an absent package looks like to import
    with pytest.raises(SystemExit) as exit_:
        main(["lm-eval", "--ckpt_path", "x.ckpt", "--tasks", TASK])
    assert exit_.value.code == 2
    assert 'pip install "midus[eval]"' in capsys.readouterr().err


@needs_lm_eval
@pytest.mark.slow
def test_the_harness_hf_model_on_an_exported_directory_scores_as_the_kit_does(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """The README's round trip: export, then the harness's own ``hf`` model on the directory gives
    the kit's scores, for the family export (LlamaForCausalLM) and for custom code."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import midus.evaluation.lm_eval_adapter  # noqa: F401  registers the harness's "midus" model

    def evaluate(model: str, model_args: str) -> dict:
        results = lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=[TASK], log_samples=False,
            task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        )
        return {k: v for k, v in results["results"][TASK].items() if k.startswith("acc")}

    kit = evaluate("midus", f"checkpoint={trained_checkpoint},batch_size=4")
    for export_format in ("auto", "custom"):
        out = tmp_path / export_format
        main(["export", "--ckpt_path", str(trained_checkpoint), "--out", str(out), "--format", export_format])
        harness = evaluate("hf", f"pretrained={out},trust_remote_code=True,batch_size=4,device=cpu")
        assert harness == pytest.approx(kit, abs=1e-9), export_format
    assert kit["acc,none"] >= 0.8  # a task the model knows: equal scores are not both chance
