"""The kit's lm-eval adapter scores as the lm-evaluation-harness's own ``hf`` model (issue 25).

A Llama-3.2-shaped stand-in (tests/hf_standins.py: random weights, a tokenizer whose
post-processor prepends ``<|begin_of_text|>``) is scored twice on the same local tasks: by the
harness's ``hf`` model on the Hugging Face directory, and by the kit's ``midus`` model on a kit
checkpoint of the same weights. Before the fix the kit added no BOS (acc 0.25 vs 0.00, bits/byte
3.9380 vs 3.9318 on one such model). Everything is offline.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from tests.hf_standins import STANDIN_TEXT, llama3_standin
from tests.test_lm_eval import offline  # noqa: F401  autouse: no hub, run from the repository root

ROOT = Path(__file__).resolve().parents[1]
MC_TASK_DIR = ROOT / "tests" / "data" / "lm_eval_task"
MC_TASK = "midus_letter_successor"
ROLLING_TASK = "midus_standin_rolling"
BPB_TOLERANCE = 5e-4

pytestmark = pytest.mark.skipif(find_spec("lm_eval") is None, reason='needs pip install "midus[eval]"')


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(Hugging Face directory, kit checkpoint of the same weights and tokenizer)."""
    from midus.checkpoint.hf_import import load_hf_checkpoint
    from midus.checkpoint.kit import STATE_PREFIX, kit_entries

    folder = tmp_path_factory.mktemp("standin")
    hf_dir = llama3_standin(folder / "hf")
    model, tokenizer = load_hf_checkpoint(hf_dir)
    checkpoint = folder / "kit" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    state = {f"{STATE_PREFIX}{name}": value for name, value in model.state_dict().items()}
    torch.save({**kit_entries(model.config, tokenizer), "state_dict": state}, checkpoint)
    return hf_dir, checkpoint


@pytest.fixture(scope="module")
def rolling_task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rolling-perplexity task (wikitext's metrics) over a few stand-in documents, 20-90 tokens each."""
    folder = tmp_path_factory.mktemp("rolling_task")
    texts = [" ".join(STANDIN_TEXT[i : i + size]) for i, size in ((0, 1), (7, 3), (40, 5), (100, 2))]
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    (folder / "rolling.yaml").write_text(
        f"task: {ROLLING_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


def evaluate(model: str, model_args: str, task_dir: Path, task: str) -> dict[str, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import midus.evaluation.lm_eval_adapter  # noqa: F401  registers "midus"

    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], log_samples=False,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    return {key: value for key, value in results["results"][task].items() if "," in key and "stderr" not in key}


def both(standin: tuple[Path, Path], task_dir: Path, task: str, extra: str = "") -> tuple[dict, dict]:
    hf_dir, checkpoint = standin
    harness = evaluate("hf", f"pretrained={hf_dir},device=cpu,dtype=float32,batch_size=4{extra}", task_dir, task)
    kit = evaluate("midus", f"checkpoint={checkpoint},batch_size=4{extra}", task_dir, task)
    print(f"\n{task}{extra}: harness {harness}\n{' ' * len(task + extra)}  kit     {kit}")
    return harness, kit


def test_multiple_choice_accuracy_equals_the_harness_hf_model(standin: tuple[Path, Path]) -> None:
    harness, kit = both(standin, MC_TASK_DIR, MC_TASK)
    assert kit["acc,none"] == harness["acc,none"] and kit["acc_norm,none"] == harness["acc_norm,none"]
    # Measured on this stand-in: 0.292 framed, 0.208 without BOS (the adapter's old scoring).
    unframed = evaluate("midus", f"checkpoint={standin[1]},add_bos_token=False", MC_TASK_DIR, MC_TASK)
    assert unframed["acc,none"] != kit["acc,none"]


@pytest.mark.parametrize("max_length", [0, 16])  # 0: each side's default (texts fit); 16: several windows
def test_rolling_perplexity_equals_the_harness_hf_model(
    standin: tuple[Path, Path], rolling_task_dir: Path, max_length: int
) -> None:
    harness, kit = both(standin, rolling_task_dir, ROLLING_TASK, f",max_length={max_length}" if max_length else "")
    assert kit["bits_per_byte,none"] == pytest.approx(harness["bits_per_byte,none"], abs=BPB_TOLERANCE)
    for metric in ("word_perplexity,none", "byte_perplexity,none"):
        assert kit[metric] == pytest.approx(harness[metric], rel=BPB_TOLERANCE)


def test_without_bos_both_score_alike_and_differently_from_framed(
    standin: tuple[Path, Path], rolling_task_dir: Path
) -> None:
    """``add_bos_token=False`` on both sides gives the old unframed scores, and they differ from
    the framed ones: the parity above is not two evaluators that ignore BOS alike."""
    harness, kit = both(standin, rolling_task_dir, ROLLING_TASK, ",add_bos_token=False")
    assert kit["bits_per_byte,none"] == pytest.approx(harness["bits_per_byte,none"], abs=BPB_TOLERANCE)
    framed = evaluate("midus", f"checkpoint={standin[1]}", rolling_task_dir, ROLLING_TASK)
    assert abs(framed["bits_per_byte,none"] - kit["bits_per_byte,none"]) > 10 * BPB_TOLERANCE


def test_default_max_length_is_the_model_context_not_a_training_block(standin: tuple[Path, Path]) -> None:
    from midus.evaluation.lm_eval_adapter import MidusEvalLM

    hf_dir, checkpoint = standin
    # The stand-in's max_position_embeddings (256; its llama3 RoPE scaling would stretch to 64 x 8 = 512),
    # as the harness's hf model reads it from the directory.
    assert MidusEvalLM(checkpoint=str(checkpoint)).max_length == 256
    from lm_eval.models.huggingface import HFLM

    assert HFLM(pretrained=str(hf_dir), device="cpu").max_length == 256
    assert MidusEvalLM(checkpoint=str(checkpoint), max_length=16).max_length == 16
    lm = MidusEvalLM(checkpoint=str(checkpoint))
    bos = lm.tokenizer.bos_token_id
    assert lm.tok_encode("the cat") == [bos, *lm.tokenizer("the cat", add_special_tokens=False)["input_ids"]]
    assert lm.tok_encode("<|begin_of_text|>the cat") == lm.tok_encode("the cat")  # not framed twice


@pytest.mark.parametrize("memory", [False, True])  # a Llama export, and a custom-code one
def test_an_exported_kit_model_is_read_with_the_context_the_adapter_reads(tmp_path: Path, memory: bool) -> None:
    """A model trained by the kit (no stated context): both read its training block size, not the
    export's old 4096 default, so the harness and the kit roll over the same windows."""
    from lm_eval.models.huggingface import HFLM

    from midus.checkpoint.export_command import export_checkpoint
    from midus.checkpoint.hf_import import load_hf_checkpoint
    from midus.checkpoint.kit import STATE_PREFIX, kit_entries
    from midus.evaluation.lm_eval_adapter import MidusEvalLM
    from midus.model import MidusLM, ModelConfig

    _, tokenizer = load_hf_checkpoint(llama3_standin(tmp_path / "standin"))
    config = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         memory_layers=[1] if memory else [], memory={"n_subkeys": 4, "topk": 2, "latent_dim": 4})
    model = MidusLM(config)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    state = {f"{STATE_PREFIX}{name}": value for name, value in model.state_dict().items()}
    torch.save({**kit_entries(model.config, tokenizer), "state_dict": state,
                "datamodule_hyper_parameters": {"block_size": 96}}, checkpoint)
    written = export_checkpoint(checkpoint, tmp_path / "export")
    assert written == ("custom code" if memory else "llama")
    assert MidusEvalLM(checkpoint=str(checkpoint)).max_length == 96
    harness = HFLM(pretrained=str(tmp_path / "export"), device="cpu", trust_remote_code=memory)
    assert harness.max_length == 96
