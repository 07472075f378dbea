"""experiments/gpu/fsdp.yaml: FSDP on GPUs, parsed and instantiated by the kit's CLI, and run on CPU.

The YAML lives under experiments/gpu/, outside the ``experiments/*.yaml`` that test_cli.py and
test_experiment_arms.py instantiate on CPU: a Trainer with FSDPStrategy needs CUDA.

* parse: the kit's parser reads the file (`parse_only`, nothing instantiated);
* instantiate: `MidusCLI` instantiates everything but the Trainer (which refuses FSDP without a
  GPU) on a tiny model and corpus, and the `FSDPStrategy` it would receive wraps and
  checkpoints the kit's block classes and writes full state dicts;
* run (slow): the YAML's strategy fits a tiny model on 2 CPU processes (gloo). FSDP does not run
  on CPU as shipped, so the launcher lifts three CPU refusals, and only those (`CPU_LAUNCHER`);
  then the checkpoint is read by the kit, exported, and up-scaled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from midus.checkpoint import (
    checkpoint_tokenizer,
    export_hf_checkpoint,
    load_hf_checkpoint,
    load_kit_checkpoint,
    read_kit_checkpoint,
)
from midus.checkpoint.hf_export import check_llama_exportable
from midus.data.datamodule import LanguageModelingData
from midus.model import MidusLM, ModelConfig
from midus.model.block import TransformerBlock
from midus.model.memory_block import MemoryBlock
from midus.model.memory_config import MemoryConfig
from midus.training import CausalLM
from midus.training.cli import MidusCLI, parse_only
from midus.upscale import UpscaleConfig

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "experiments" / "gpu" / "fsdp.yaml"
BLOCKS = {TransformerBlock, MemoryBlock}


def tiny(cache: Path, save_dir: Path) -> list[str]:
    """Overrides that shrink the YAML's model and data to seconds (the embedded corpus, no network)."""
    return [
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--model.config.d_model", "32",
        "--model.config.n_layers", "2",
        "--model.config.n_heads", "4",
        "--model.config.n_kv_heads", "2",
        "--model.optimizer.learning_rate", "0.003",
        "--model.schedule.warmup_steps", "2",
        "--data.source", "embedded",
        "--data.embedded.num_people", "20",
        "--data.embedded.docs_per_person", "3",
        "--data.bpe_vocab_size", "300",
        "--data.block_size", "32",
        "--data.batch_size", "8",
        "--data.num_workers", "0",
        "--data.cache_dir", str(cache),
    ]


def test_the_fsdp_yaml_parses_with_the_kits_parser() -> None:
    assert YAML.read_text(encoding="utf-8").startswith("# python -m midus fit --config experiments/gpu/fsdp.yaml\n")
    parsed = parse_only(["fit", "--config", str(YAML)])
    trainer = parsed.trainer
    assert (trainer.accelerator, trainer.devices, trainer.precision) == ("gpu", "auto", "bf16-mixed")
    strategy = trainer.strategy
    assert strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy.init_args.auto_wrap_policy == BLOCKS  # class paths parse to a set of classes
    assert strategy.init_args.activation_checkpointing_policy == BLOCKS
    assert strategy.init_args.state_dict_type == "full"
    precision = strategy.init_args.mixed_precision
    assert (precision.param_dtype, precision.reduce_dtype, precision.buffer_dtype) == (
        torch.bfloat16, torch.float32, torch.float32,
    )
    # "To turn it off ... --trainer.strategy.init_args.activation_checkpointing_policy null"
    off = parse_only(["fit", "--config", str(YAML), "--trainer.strategy.init_args.activation_checkpointing_policy",
                      "null"])
    assert off.trainer.strategy.init_args.activation_checkpointing_policy is None


def test_the_fsdp_yaml_model_is_the_one_its_header_quotes() -> None:
    """"a 333 M-parameter Llama-style base (24 Transformer blocks, d 1024, 16 heads, 4 KV heads,
    untied 32k BPE, 332,973,056 parameters)", pure Llama so that it exports."""
    parsed = parse_only(["fit", "--config", str(YAML)])
    config = ModelConfig(**{**parsed.model.config.as_dict(), "vocab_size": parsed.data.bpe_vocab_size})
    with torch.device("meta"):  # the shapes without the memory
        model = MidusLM(config)
    shape = (config.depth, config.d_model, config.n_heads, config.kv_heads, config.vocab_size)
    assert shape == (24, 1024, 16, 4, 32768)
    assert [type(block) for block in model.blocks] == [TransformerBlock] * 24 and not config.tie_embeddings
    assert model.num_parameters() == 332_973_056 and round(model.num_parameters() / 1e6) == 333
    check_llama_exportable(config)
    # "16 × 1024 tokens per GPU: 131,072 tokens on 8 GPUs"
    assert parsed.data.batch_size * parsed.data.block_size * 8 == 131_072


class TrainerlessCLI(MidusCLI):
    """Instantiates what the Trainer would receive, but not the Trainer (it refuses FSDP without CUDA)."""

    def instantiate_trainer(self, **kwargs):
        self.trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return None


@pytest.mark.parametrize("checkpointing", ["on", "off"])
def test_the_fsdp_yaml_instantiates_its_strategy(checkpointing: str, tiny_cache: Path, tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    off = ["--trainer.strategy.init_args.activation_checkpointing_policy", "null"] if checkpointing == "off" else []
    cli = TrainerlessCLI(
        CausalLM, LanguageModelingData, run=False, auto_configure_optimizers=False,
        args=["--config", str(YAML), *tiny(tiny_cache, tmp_path / "runs"), *off],
    )
    strategy = cli.trainer_config["strategy"]
    assert type(strategy) is FSDPStrategy
    wrap = strategy.kwargs["auto_wrap_policy"]  # what FullyShardedDataParallel(...) is given
    assert isinstance(wrap, ModuleWrapPolicy) and wrap._module_classes == BLOCKS
    if checkpointing == "on":
        recompute = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
        assert isinstance(recompute, ModuleWrapPolicy) and recompute._module_classes == BLOCKS
    else:
        assert strategy._activation_checkpointing_kwargs == {}
    assert strategy._state_dict_type == "full" and strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy.kwargs["use_orig_params"]  # Lightning's default: the optimizer's groups see the real parameters
    assert strategy.mixed_precision == MixedPrecision(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
    )
    assert cli.trainer_config["accelerator"] == "gpu" and cli.trainer_config["precision"] == "bf16-mixed"
    assert cli.trainer_config["gradient_clip_val"] is None  # FSDPPrecision refuses clipping by norm
    assert cli.model.model.config.vocab_size == cli.datamodule.vocab_size  # the kit's link still applies


# Runs `python -m midus` with FSDP on CPU processes (gloo). Each patch lifts one refusal of a CPU
# run and changes nothing a GPU run does; then every process passes one batch through the sharded
# model (FSDP's own forward) and process 0 records the logits and what FSDP wrapped.
CPU_LAUNCHER = '''
import json
import os
import sys

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp
from lightning.pytorch.trainer.connectors import accelerator_connector
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, FullyShardedDataParallel
from torch.distributed.fsdp import StateDictType

# 1. Lightning: "The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`".
_check = accelerator_connector._AcceleratorConnector._check_strategy_and_fallback


def _allow_fsdp_on_cpu(self):
    if self._accelerator_flag == "cpu" and type(self._strategy_flag) is FSDPStrategy:
        return None
    return _check(self)


accelerator_connector._AcceleratorConnector._check_strategy_and_fallback = _allow_fsdp_on_cpu

# 2. torch: "FSDP needs a non-CPU accelerator device, but no accelerator device is detected" unless
# device_id names the CPU (Lightning passes the device index, None for the CPU).
_init = FullyShardedDataParallel.__init__


def _init_on_cpu(self, module, *args, device_id=None, **kwargs):
    _init(self, module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


FullyShardedDataParallel.__init__ = _init_on_cpu


# 3. Lightning gathers full state dicts with offload_to_cpu=True, which crashes (segmentation fault)
# when the device already is the CPU: gather them in place instead.
def _full_state_dict_context(module, world_size, rank0_only=True):
    return FullyShardedDataParallel.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


lightning_fsdp._get_full_state_dict_context = _full_state_dict_context

from midus.cli import main  # noqa: E402

cli = main(sys.argv[1:])
sharded = cli.trainer.strategy.model
vocab = cli.model.model.config.vocab_size
ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
sharded.eval()
with torch.no_grad():
    logits = sharded(ids)  # a collective: every process runs it
if cli.trainer.is_global_zero:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    modules = list(sharded.modules())
    units = [type(m.module).__name__ for m in modules if isinstance(m, FullyShardedDataParallel)]
    checkpointed = [type(m._checkpoint_wrapped_module).__name__ for m in modules if isinstance(m, CheckpointWrapper)]
    torch.save({"ids": ids, "logits": logits}, os.environ["MIDUS_FSDP_LOGITS"])
    with open(os.environ["MIDUS_FSDP_REPORT"], "w") as report:
        json.dump({"units": units, "checkpointed": checkpointed, "world_size": cli.trainer.world_size}, report)
'''


@pytest.mark.slow
def test_fsdp_fit_on_two_cpu_processes_writes_a_checkpoint_the_kit_reads_exports_and_upscales(
    tiny_cache: Path, tmp_path: Path
) -> None:
    launcher = tmp_path / "fsdp_on_cpu.py"
    launcher.write_text(CPU_LAUNCHER, encoding="utf-8")
    report, logits_file = tmp_path / "report.json", tmp_path / "logits.pt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "MIDUS_FSDP_REPORT": str(report),
        "MIDUS_FSDP_LOGITS": str(logits_file),
    }
    command = [
        sys.executable, str(launcher), "fit", "--config", str(YAML), *tiny(tiny_cache, tmp_path / "runs"),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.precision", "32-true",  # FSDPPrecision's bf16 autocast is CUDA's
        "--trainer.strategy.init_args.mixed_precision", "null",
        "--trainer.max_steps", "12",
        "--trainer.val_check_interval", "6",
        "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false",
    ]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"FSDP fit failed (exit {run.returncode}):\n{run.stderr[-6000:]}"

    # FSDP made every block its own unit (the root unit: the rest), each block activation-checkpointed.
    wrapped = json.loads(report.read_text())
    assert wrapped["world_size"] == 2
    assert wrapped["units"] == ["CausalLM", "TransformerBlock", "TransformerBlock"]
    assert wrapped["checkpointed"] == ["TransformerBlock", "TransformerBlock"]

    # state_dict_type: full — last.ckpt is one ordinary file with the kit's entries and clean names.
    last = tmp_path / "runs" / "fsdp" / "base" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    stored = read_kit_checkpoint(last)
    assert stored["global_step"] == 12
    wrapper_names = [name for name in stored["state_dict"] if "_fsdp_wrapped" in name or "_checkpoint_wrapped" in name]
    assert not wrapper_names

    # The kit's reader rebuilds the model the sharded run ended with: the same logits.
    model = load_kit_checkpoint(last).eval()
    assert (model.config.d_model, model.config.depth) == (32, 2)
    live = torch.load(logits_file)
    with torch.no_grad():
        torch.testing.assert_close(model(live["ids"]), live["logits"])

    # Export to Hugging Face and back: the same logits.
    tokenizer = checkpoint_tokenizer(stored)
    exported = export_hf_checkpoint(model, tmp_path / "export", tokenizer=tokenizer)
    reloaded, reloaded_tokenizer = load_hf_checkpoint(exported)
    assert reloaded_tokenizer is not None and len(reloaded_tokenizer) == len(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(live["ids"]), live["logits"])

    # Up-scaling from it (MIDUS: a memory block after each block, values zero): identical at insertion.
    upscaled = CausalLM(
        upscale=UpscaleConfig(
            base_checkpoint=str(last), method="midus", every=1,
            memory=MemoryConfig(n_subkeys=8, topk=4, latent_dim=8),
        )
    ).eval()
    assert [type(block) for block in upscaled.model.blocks] == [TransformerBlock, MemoryBlock] * 2
    assert upscaled.base_parameters == model.num_parameters()
    with torch.no_grad():
        torch.testing.assert_close(upscaled(live["ids"]), live["logits"])
