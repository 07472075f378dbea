"""`midus.probes` used directly, without Lightning, and the recall probe framed as documents are."""

from __future__ import annotations

import copy

import pytest
import torch

from midus.data.corpus import RecallItem
from midus.data.recall_probe import tokenize_probe
from midus.model import MidusLM, ModelConfig
from midus.model.memory_config import MemoryConfig
from midus.model.transformer import next_token_loss
from midus.probes import ProbeConfig, Processes, ValidationProbes
from tests.hf_standins import STANDIN_TEXT, bos_tokenizer

ITEMS = [RecallItem("Vepen Futil", "birth_city", "Vepen Futil was born in", "Lima"),
         RecallItem("Ada Ro", "employer", "Ada Ro works for", "Acme")]


def test_recall_prompts_start_as_packed_documents_do(tiny_data) -> None:
    kit = tiny_data.tokenizer  # the kit's BPE frames nothing: the prompts are as they always were
    plain = kit([item.prompt for item in ITEMS], add_special_tokens=False)["input_ids"]
    assert [q.prompt for q in tokenize_probe(ITEMS, kit)] == [[kit.eos_token_id, *ids] for ids in plain]
    llama = bos_tokenizer(STANDIN_TEXT)  # prepends BOS as Llama-3's does: so do the prompts (frame_prompts)
    plain = llama([item.prompt for item in ITEMS], add_special_tokens=False)["input_ids"]
    questions = tokenize_probe(ITEMS, llama)
    assert [q.prompt for q in questions] == [[llama.bos_token_id, *ids] for ids in plain]
    assert questions[0].answer == llama(" Lima", add_special_tokens=False)["input_ids"]  # answers are not framed


def test_probes_without_lightning_report_the_zeroed_loss_of_the_batches_observed() -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, memory_layers=[1],
                         memory_branch="hml", memory=MemoryConfig(n_subkeys=8, topk=4, latent_dim=8,
                                                                  zero_init_values=False))
    model = MidusLM(config).eval()
    probes = ValidationProbes(ProbeConfig(recall_questions=0))
    batches = [torch.randint(0, 40, (2, 17)) for _ in range(3)]
    probes.start(model, full=True)
    total, tokens = 0.0, 0
    without_memory = copy.deepcopy(model)
    del without_memory.blocks[1]  # a memory block with its branch zeroed passes its input on
    with torch.no_grad():
        for ids in batches:
            loss = next_token_loss(model(ids[:, :-1]), ids[:, 1:])
            probes.observe(model, ids[:, :-1], ids[:, 1:], loss, ids[:, 1:].numel())
            total += float(next_token_loss(without_memory(ids[:, :-1]), ids[:, 1:]) - loss) * ids[:, 1:].numel()
            tokens += ids[:, 1:].numel()
    metrics = probes.finish(model, {}, None, Processes())
    assert float(metrics["memory/zeroed/loss_delta"]) == pytest.approx(total / tokens, abs=1e-6)
    assert metrics["memory/zeroed/1/loss_delta"] == metrics["memory/zeroed/loss_delta"]  # one block: both names
    assert 0 < metrics["memory/1/usage"] <= 1
    # A validation that is not a full one (a partial sanity check) measures nothing.
    probes.start(model, full=False)
    probes.observe(model, batches[0][:, :-1], batches[0][:, 1:], torch.tensor(1.0), 32)
    assert probes.finish(model, {}, None, Processes()) == {}


@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_a_moved_probe_key_is_one_error_line_naming_its_new_place(tmp_path, capsys, where) -> None:
    from midus.cli import main

    config = tmp_path / "old.yaml"
    config.write_text("model:\n  optimizer:\n    learning_rate: 0.001\n  recall_probe_size: 0\n" if where == "yaml"
                      else "{}\n")
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")]
    args += ["--model.recall_probe_size", "0"] if where == "flag" else []
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "model.recall_probe_size moved" in error
    assert "model.probes.recall_questions" in error
    assert not (tmp_path / "run").exists()  # nothing written
