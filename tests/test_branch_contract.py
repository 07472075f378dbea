"""The branch contract (`midus.model.branches.Branch`): registration, capabilities as class
attributes, the parameters each branch declares for the optimizer, and which branch reads
which memory setting."""

from __future__ import annotations

import dataclasses
import re

import pytest
from torch import nn

from midus.model import MemoryConfig, MidusLM, ModelConfig
from midus.model.branches import available_branches, branch_class, register_branch
from midus.model.retrieval.product_keys import ProductKeys
from midus.model.retrieval.value_lookup import MemoryValues
from midus.training.optim import parameter_groups

READERS = {"memory block", *available_branches()}


def test_registering_something_that_is_not_a_branch_fails() -> None:
    with pytest.raises(TypeError, match="must subclass"):
        register_branch("plain_module")(nn.Linear)
    assert "plain_module" not in available_branches()


def test_capabilities_are_class_attributes_known_before_building() -> None:
    flags = {name: (branch_class(name).reads_attention_heads, branch_class(name).is_product_key_memory)
             for name in available_branches()}
    assert flags == {"ffn": (False, False), "pkm": (False, True), "multihead_pkm": (False, True), "hml": (True, True)}


@pytest.mark.parametrize("branch", ["pkm", "multihead_pkm", "hml"])
def test_declared_value_tables_and_subkeys_are_the_memory_modules_parameters(branch: str) -> None:
    model = MidusLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, memory_layers=[1],
                                memory_branch=branch, memory={"n_subkeys": 8, "topk": 4, "latent_dim": 8}))
    memory = model.blocks[1].branch
    values = [module.weight for module in memory.modules() if isinstance(module, MemoryValues)]
    subkeys = [module.subkeys for module in memory.modules() if isinstance(module, ProductKeys)]
    assert [id(p) for p in memory.value_tables()] == [id(p) for p in values]
    assert [id(p) for p in memory.subkey_tables()] == [id(p) for p in subkeys]
    for memory_keys in (False, True):
        groups = {group["name"]: {id(p) for p in group["params"]}
                  for group in parameter_groups(model, 0.1, 0.01, memory_keys)}
        expected_memory = {id(p) for p in values} | ({id(p) for p in subkeys} if memory_keys else set())
        assert groups["memory"] == expected_memory
        assert not {id(p) for p in subkeys} & groups["decay"]  # sub-keys are never decayed


def test_a_dense_branch_declares_no_memory_parameters() -> None:
    model = MidusLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4))
    assert all(block.branch.value_tables() == [] and block.branch.subkey_tables() == [] for block in model.blocks)
    assert "memory" not in {group["name"] for group in parameter_groups(model, 0.1, 0.01, True)}
    assert model.num_memory_parameters() == 0


def field_docs() -> dict[str, str]:
    """Each MemoryConfig field's docstring (the --help text), read from the source."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(MemoryConfig)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = following.value.value
    return docs


def test_every_memory_setting_names_the_branches_or_block_that_read_it() -> None:
    docs = field_docs()
    assert set(docs) == {field.name for field in dataclasses.fields(MemoryConfig)}
    for name, doc in docs.items():
        match = re.match(r"\[([^\]]+)\] ", doc)
        assert match, f"memory.{name}: its help must start with [reader, ...]"
        readers = {reader.strip() for reader in match.group(1).split(",")}
        assert readers <= READERS, f"memory.{name}: unknown readers {readers - READERS}"


@pytest.mark.parametrize("field, value", [("values", "per_head"), ("latent_dim", 4), ("combine", "sum")])
def test_hml_only_settings_leave_pkm_unchanged(field: str, value: object) -> None:
    # A setting tagged [hml] must not change what a PKM branch builds.
    def build(memory: dict) -> dict[str, tuple]:
        model = MidusLM(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, memory_layers=[1],
                                    memory_branch="pkm", memory={"n_subkeys": 8, "topk": 4, **memory}))
        return {name: tuple(p.shape) for name, p in model.named_parameters()}

    assert build({}) == build({field: value})
