"""``python -m midus export``: every kit model loads in transformers, memory models as custom code.

The custom-code directories are loaded in a fresh process in which ``import midus`` fails, so
they prove that the exported directory alone builds the model (offline, HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from midus.checkpoint.hf_custom_code import custom_code_files, relative_imports
from midus.checkpoint.kit import MODEL_CONFIG_KEY, TOKENIZER_KEY, tokenizer_record
from midus.cli import main
from midus.data.tokenizers import train_char
from midus.model import MidusLM, ModelConfig

VOCAB = 64
MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8, "zero_init_values": False}
# Every memory branch and HML value layout, in memory blocks (layers 1, 3) of a T M T M model.
LAYOUTS = {
    "hml_hive": {"memory_branch": "hml", "memory": {**MEMORY, "values": "hive"}},
    "hml_per_head": {"memory_branch": "hml", "memory": {**MEMORY, "values": "per_head"}},
    "hml_shared": {"memory_branch": "hml", "memory": {**MEMORY, "values": "shared", "output_gate": True}},
    "pkm": {"memory_branch": "pkm", "memory": {**MEMORY}},
    "multihead_pkm": {"memory_branch": "multihead_pkm", "memory": {**MEMORY}},
    "hml_untied_full_attention_qk_norm": {
        "memory_branch": "hml", "tie_embeddings": False, "qk_norm": True,
        "memory": {**MEMORY, "values": "hive", "attn_output_projection": True, "key_norm": "rmsnorm"},
    },
    # memory.n_subspaces: the exported config carries it; heads of 8 in four parts, PKM queries of 24 in three.
    "hml_hive_four_subspaces": {"memory_branch": "hml", "memory": {**MEMORY, "values": "hive", "n_subspaces": 4}},
    "pkm_three_subspaces": {"memory_branch": "pkm", "memory": {**MEMORY, "n_subspaces": 3, "pkm_query_dim": 24}},
}
NEW_TOKENS = 8

# Runs in a fresh process: the kit is made unimportable, so only the directory's code can build the model.
LOADER = """
import json, sys
sys.modules["midus"] = None
import torch
from transformers import AutoModelForCausalLM
directories, ids_path, out_path, new_tokens = json.loads(sys.argv[1])
ids = torch.load(ids_path)
results = {}
for name, directory in directories.items():
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids).logits
    greedy = model.generate(ids[:1], max_new_tokens=new_tokens, do_sample=False)
    results[name] = {"logits": logits, "greedy": greedy, "class": type(model).__name__}
torch.save(results, out_path)
"""


def tiny_model(layout: dict, seed: int) -> MidusLM:
    torch.manual_seed(seed)
    fields = {key: value for key, value in layout.items() if key != "memory"}
    if "memory_branch" in layout:
        fields.update(memory_layers=[1, 3], memory=layout["memory"])
    config = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, **fields)
    model = MidusLM(config).eval()
    with torch.no_grad():  # random, non-zero values everywhere: a zero table would hide a lost weight
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def load_in_fresh_process(directories: dict[str, Path], ids: torch.Tensor, tmp_path: Path) -> dict:
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(ids, ids_path)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    arguments = json.dumps([{k: str(v) for k, v in directories.items()}, str(ids_path), str(out_path), NEW_TOKENS])
    done = subprocess.run([sys.executable, "-c", LOADER, arguments], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out_path)


def write_kit_checkpoint(model: MidusLM, path: Path, tokenizer=None) -> Path:
    """A kit .ckpt as fit writes it (the entries export reads): state dict under model., config, tokenizer."""
    stored = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
              MODEL_CONFIG_KEY: dataclasses.asdict(model.config)}
    if tokenizer is not None:
        stored[TOKENIZER_KEY] = tokenizer_record(tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stored, path)
    return path


@pytest.mark.slow
def test_every_memory_layout_exports_as_custom_code_with_logits_and_greedy_parity(tmp_path: Path) -> None:
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    models, directories = {}, {}
    for index, (name, layout) in enumerate(LAYOUTS.items()):
        models[name] = tiny_model(layout, seed=index)
        checkpoint = write_kit_checkpoint(models[name], tmp_path / name / "last.ckpt")
        directories[name] = tmp_path / "exported" / name
        main(["export", "--ckpt_path", str(checkpoint), "--out", str(directories[name])])
        config = json.loads((directories[name] / "config.json").read_text())
        assert config["model_type"] == "midus" and config["auto_map"]["AutoModelForCausalLM"]
    loaded = load_in_fresh_process(directories, ids, tmp_path)
    for name, model in models.items():
        with torch.no_grad():
            expected = model(ids)
        assert loaded[name]["class"] == "MidusForCausalLM"
        torch.testing.assert_close(loaded[name]["logits"], expected, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(loaded[name]["greedy"], model.generate(ids[:1], NEW_TOKENS)), name


def test_a_pure_llama_model_exports_as_llama_unless_custom_is_asked(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model({}, seed=0)
    tokenizer = train_char([["abcdefgh ij"]])
    checkpoint = write_kit_checkpoint(model, tmp_path / "pure.ckpt", tokenizer)
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "llama")])
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
    assert (tmp_path / "llama" / "tokenizer.json").is_file()  # the checkpoint's tokenizer, beside the weights
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "custom"), "--format", "custom"])
    assert json.loads((tmp_path / "custom" / "config.json").read_text())["model_type"] == "midus"


def test_bad_input_is_one_error_before_anything_is_written(tmp_path: Path, capsys) -> None:
    model = tiny_model(LAYOUTS["hml_hive"], seed=0)
    checkpoint = write_kit_checkpoint(model, tmp_path / "last.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases = [
        (["--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "a")], "missing.ckpt"),
        (["--ckpt_path", str(foreign), "--out", str(tmp_path / "b")], "was not written by the kit"),
        (["--ckpt_path", str(checkpoint), "--out", str(taken)], "exists and is not an empty folder"),
    ]
    for args, expected in cases:
        with pytest.raises(SystemExit) as stop:
            main(["export", *args])
        assert stop.value.code == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


def test_kit_imports_become_relative_and_outside_imports_are_refused() -> None:
    modules = {"midus.model", "midus.model.branches", "midus.model.branches.ffn", "midus.model.config"}
    source = "from midus.model.config import ModelConfig\n    from midus.model.branches import ffn  # noqa\n"
    assert relative_imports(source, modules, "x") == (
        "from .midus_model_config import ModelConfig\n    from .midus_model_branches_ffn import *  # noqa: F401,F403\n"
    )
    with pytest.raises(ValueError, match="midus.data.corpus, which is not part of the exported model package"):
        relative_imports("from midus.data.corpus import X\n", modules, "x")
    # The shipped model package is self-contained: no kit import is left in any exported file.
    for name, text in custom_code_files().items():
        assert "from midus" not in text and "import midus" not in text, name
