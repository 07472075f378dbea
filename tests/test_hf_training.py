"""Training from a Hugging Face directory: plain continuation and up-scaling, end to end, and the
errors of `midus.training.model_source` when the starting model is named wrongly.

The checkpoint is a tiny random Llama saved offline with `save_pretrained`, with a tokenizer
(the tiny BPE of the `tiny_data` fixture) saved into the same directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from midus.checkpoint import load_kit_checkpoint
from midus.checkpoint.kit import TOKENIZER_KEY, read_kit_checkpoint
from midus.cli import main
from midus.model import ModelConfig
from midus.model.transformer import next_token_loss
from midus.probes import ProbeConfig
from midus.training import CausalLM
from midus.upscale import UpscaleConfig
from tests.hf_standins import randomised

ROOT = Path(__file__).resolve().parents[1]
HF_VOCAB = 320  # more embeddings than the 300-token tokenizer, as real checkpoints pad their vocabularies
MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data) -> Path:
    """A random 2-layer Llama (every tensor randomised, so a swapped name shows) and its tokenizer."""
    directory = tmp_path_factory.mktemp("hf_llama")
    assert len(tiny_data.tokenizer) <= HF_VOCAB
    config = LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    model = randomised(LlamaForCausalLM(config).eval())
    model.save_pretrained(directory)
    tiny_data.tokenizer.save_pretrained(str(directory))
    return directory


def hf_model(directory: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def val_ids(data) -> torch.Tensor:
    return torch.stack([block["input_ids"] for block in data.val_blocks])


def hf_val_loss(directory: Path, data) -> float:
    """Transformers' next-token loss on every validation block (the kit weights val/loss by tokens)."""
    ids = val_ids(data)
    with torch.no_grad():
        return next_token_loss(hf_model(directory)(ids[:, :-1]).logits, ids[:, 1:]).item()


def fit_args(tmp_path: Path, cache: Path, directory: Path, *extra: str) -> list[str]:
    """The quickstart shrunk to seconds on the HF directory's tokenizer; the corpus of `tiny_data`."""
    return [
        "fit",
        "--config",
        str(ROOT / "experiments" / "quickstart.yaml"),
        "--data.tokenizer",
        "hf",
        "--data.tokenizer_path",
        str(directory),
        *extra,
        "--trainer.max_steps",
        "10",
        "--trainer.val_check_interval",
        "5",
        "--trainer.log_every_n_steps",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--model.optimizer.learning_rate",
        "0.01",
        "--model.schedule.warmup_steps",
        "2",
        "--model.probes.recall_questions",
        "0",
        "--data.embedded.num_people",
        "30",
        "--data.embedded.docs_per_person",
        "4",
        "--data.block_size",
        "32",
        "--data.batch_size",
        "8",
        "--data.cache_dir",
        str(cache),
    ]


def logged_val_losses(run: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("val/loss")]


def assert_reloads(run: Path, trained, directory: Path, depth: int) -> None:
    """last.ckpt rebuilds the trained model (no base needed) and carries the HF directory's tokenizer."""
    last = run / "checkpoints" / "last.ckpt"
    reloaded = load_kit_checkpoint(last).eval()
    assert reloaded.config.depth == depth and reloaded.config.vocab_size == HF_VOCAB
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), trained.eval()(ids))
    stored = read_kit_checkpoint(last)[TOKENIZER_KEY]
    assert (
        PreTrainedTokenizerFast.from_pretrained(str(directory)).backend_tokenizer.to_str() == stored["tokenizer_json"]
    )


# ---- the starting model, built directly (fast) ----


def test_pretrained_module_starts_with_the_checkpoints_logits(hf_dir: Path, tiny_data) -> None:
    module = CausalLM(ModelConfig(vocab_size=tiny_data.vocab_size), pretrained=str(hf_dir),
        probes=ProbeConfig(recall_questions=0))
    assert module.model.config.vocab_size == HF_VOCAB and module.model.config.d_model == 32  # not model.config's
    assert module.added_parameters == 0
    ids = val_ids(tiny_data)[:2]
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval()(ids), hf_model(hf_dir)(ids).logits)


@pytest.mark.parametrize(
    ("settings", "depth"),
    [
        (dict(method="midus", every=1, memory=MEMORY), 4),
        (dict(method="dus_interleave", every=1), 4),
        (dict(method="dus_solar", drop=0), 4),
    ],
    ids=["midus", "dus_interleave", "dus_solar"],
)
def test_upscaling_a_hf_directory_keeps_its_function(hf_dir: Path, tiny_data, settings: dict, depth: int) -> None:
    upscale = UpscaleConfig(base_checkpoint=str(hf_dir), **settings)
    module = CausalLM(ModelConfig(vocab_size=tiny_data.vocab_size), upscale=upscale,
        probes=ProbeConfig(recall_questions=0))
    assert module.model.config.depth == depth and module.model.config.vocab_size == HF_VOCAB
    assert module.added_parameters > 0 and module.base_parameters == hf_model(hf_dir).num_parameters()
    ids = val_ids(tiny_data)[:2]
    with torch.no_grad():
        kit, hf = module.model.eval()(ids), hf_model(hf_dir)(ids).logits
    if settings["method"] == "dus_solar":  # two stacked copies: a different function, by design
        assert (kit - hf).abs().max() > 1e-2
    else:  # zeroed copies / zero memory values: the identity at insertion
        torch.testing.assert_close(kit, hf, rtol=0, atol=1e-5)


# ---- end to end through the CLI ----


@pytest.mark.slow
def test_fit_from_a_hf_directory(hf_dir: Path, tiny_data, tiny_cache: Path, tmp_path: Path) -> None:
    cli = main(fit_args(tmp_path, tiny_cache, hf_dir, "--model.pretrained", str(hf_dir)))
    run = tmp_path / "runs" / "quickstart" / "ffn"
    assert len(cli.datamodule.tokenizer) == len(tiny_data.tokenizer)
    losses = logged_val_losses(run)
    # The full sanity pass at step 0 scored the imported weights: transformers' own loss on the same blocks.
    assert losses[0][0] == 0
    assert losses[0][1] == pytest.approx(hf_val_loss(hf_dir, cli.datamodule), rel=1e-4)
    assert len(losses) == 3 and losses[-1][1] < losses[0][1] - 0.3  # step 0, then after steps 5 and 10: it learned
    trained = cli.model.model
    start = hf_model(hf_dir)
    assert not torch.allclose(trained.blocks[0].attn.q_proj.weight, start.model.layers[0].self_attn.q_proj.weight)
    assert_reloads(run, trained, hf_dir, depth=2)


@pytest.mark.slow
def test_midus_upscaling_of_a_hf_directory(hf_dir: Path, tiny_cache: Path, tmp_path: Path) -> None:
    memory = [arg for key, value in MEMORY.items() for arg in (f"--model.upscale.memory.{key}", str(value))]
    cli = main(
        fit_args(
            tmp_path,
            tiny_cache,
            hf_dir,
            "--model.upscale.base_checkpoint",
            str(hf_dir),
            "--model.upscale.method",
            "midus",
            "--model.upscale.every",
            "1",
            "--model.upscale.trainable",
            "new",
            *memory,
        )
    )
    run = tmp_path / "runs" / "quickstart" / "ffn"
    module = cli.model
    assert [spec.block for spec in module.model.config.stack] == ["transformer", "memory"] * 2
    losses = logged_val_losses(run)
    # Identity at insertion: the up-scaled model's step-0 loss is the HF model's.
    assert losses[0][0] == 0
    assert losses[0][1] == pytest.approx(hf_val_loss(hf_dir, cli.datamodule), rel=1e-5)
    assert len(losses) == 3 and losses[-1][1] < losses[0][1]
    # trainable=new: the copied base blocks are the HF weights still; the memory learned.
    start = hf_model(hf_dir)
    torch.testing.assert_close(module.model.blocks[0].attn.q_proj.weight, start.model.layers[0].self_attn.q_proj.weight)
    assert module.model.blocks[1].branch.values.weight.abs().sum() > 0
    assert_reloads(run, module.model, hf_dir, depth=4)


# ---- the starting model named wrongly: one ValueError naming the field ----


def test_pretrained_and_an_upscale_base_together(hf_dir: Path) -> None:
    upscale = UpscaleConfig(base_checkpoint=str(hf_dir), method="midus", every=1)
    with pytest.raises(
        ValueError, match=r"model\.pretrained and model\.upscale\.base_checkpoint both name a starting model"
    ):
        CausalLM(ModelConfig(vocab_size=300), pretrained=str(hf_dir), upscale=upscale)


@pytest.mark.parametrize("method", ["midus", "dus_interleave"])
def test_an_upscale_method_without_a_base(method: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.upscale\.method='{method}' needs model\.upscale\.base_checkpoint"):
        CausalLM(ModelConfig(vocab_size=300), upscale=UpscaleConfig(method=method, every=1))


@pytest.mark.parametrize("field", ["model.pretrained", "model.upscale.base_checkpoint"])
def test_a_data_vocabulary_larger_than_the_models_embeddings(hf_dir: Path, field: str) -> None:
    options = (
        dict(pretrained=str(hf_dir))
        if field == "model.pretrained"
        else dict(upscale=UpscaleConfig(base_checkpoint=str(hf_dir), method="dus_interleave", every=1))
    )
    message = rf"{field}='{hf_dir}' has {HF_VOCAB} token embeddings but the data tokenizer has {HF_VOCAB + 1} tokens"
    with pytest.raises(ValueError, match=message):
        CausalLM(ModelConfig(vocab_size=HF_VOCAB + 1), **options)
    CausalLM(ModelConfig(vocab_size=HF_VOCAB),
        probes=ProbeConfig(recall_questions=0), **options)  # equal sizes are fine


@pytest.mark.slow
def test_cli_refuses_a_data_tokenizer_bigger_than_the_model(tmp_path: Path, tiny_cache: Path, tiny_data) -> None:
    small = tmp_path / "small_llama"  # 280 embeddings; the data's own BPE has 300 tokens
    config = LlamaConfig(
        vocab_size=280,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        bos_token_id=None,
        eos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(small)
    tokenizer = tmp_path / "tokenizer300"  # an hf tokenizer with more tokens than the model has embeddings
    tiny_data.tokenizer.save_pretrained(str(tokenizer))
    args = fit_args(tmp_path, tiny_cache, tokenizer, "--model.pretrained", str(small))
    with pytest.raises(SystemExit) as failure:  # one "error:" line, exit 2
        main(args)
    assert failure.value.code == 2
    assert re.search(
        r"model\.pretrained=.* has 280 token embeddings but the data tokenizer has 300", str(failure.value.__context__)
    )
    assert not (tmp_path / "runs").exists()  # failed before the Trainer wrote anything
