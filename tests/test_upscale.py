"""Up-scaling surgery: identity at insertion, SOLAR stacking, MIDUS attention copies, training policy, sources,
the method registry."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from midus.checkpoint import load_base
from midus.model import MidusLM, ModelConfig
from midus.training.optim import parameter_groups
from midus.upscale import (
    UpscaleConfig,
    apply_trainable,
    method_names,
    register_upscale,
    registered_methods,
    upscale,
)

VOCAB = 40
MEMORY = {"n_subkeys": 8, "topk": 4, "latent_dim": 8}


def base_model(seed: int = 0, **overrides) -> MidusLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, init_std=0.2)
    fields.update(overrides)
    return MidusLM(ModelConfig(**fields)).eval()


def ids(time: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, time), generator=torch.Generator().manual_seed(1))


# Settings under which every registered method up-scales the 4-block base of `base_model`, each
# with its own defaults otherwise (a method that reads fields of its own sets them here).
REGISTERED_DEFAULTS = {"every": 2, "top_blocks": 2, "memory": MEMORY}
IDENTITY_METHODS = [method.name for method in registered_methods() if method.identity_at_insertion]
OTHER_METHODS = [method.name for method in registered_methods() if not method.identity_at_insertion]

IDENTITY_SETTINGS = {
    # Every method registered with identity_at_insertion=True, under its defaults: a new one is tested here.
    **{f"{name}-defaults": {**REGISTERED_DEFAULTS, "method": name} for name in IDENTITY_METHODS},
    "interleave-every-2": {"method": "dus_interleave", "every": 2},
    "interleave-positions": {"method": "dus_interleave", "positions": [0, 3]},
    "top-zeroed": {"method": "dus_top", "top_blocks": 2},
    "midus-hml-hive": {"method": "midus", "every": 1, "memory": MEMORY},
    "midus-hml-per_head": {"method": "midus", "positions": [1], "memory": {**MEMORY, "values": "per_head"}},
    "midus-pkm": {"method": "midus", "every": 2, "branch": "pkm", "memory": MEMORY},
    "midus-hml-random-bank-zero-projections": {
        "method": "midus", "every": 2, "memory": {**MEMORY, "zero_init_values": False, "zero_init_head_proj": True},
    },
    "midus-hml-full-attention": {"method": "midus", "every": 2, "memory": {**MEMORY, "attn_output_projection": True}},
    "midus-hml-random-values-output-gate": {
        "method": "midus", "every": 2, "memory": {**MEMORY, "zero_init_values": False, "output_gate": True},
    },
    "midus-pkm-random-values-output-gate": {
        "method": "midus", "positions": [1], "branch": "pkm",
        "memory": {**MEMORY, "zero_init_values": False, "output_gate": True},
    },
    "midus-multihead_pkm-random-attn": {
        "method": "midus", "every": 2, "branch": "multihead_pkm", "attn_init": "random", "memory": MEMORY,
    },
}


@pytest.mark.parametrize("name", IDENTITY_SETTINGS)
def test_identity_preserving_upscaling_keeps_the_base_logits(name: str) -> None:
    base = base_model()
    model, inserted = upscale(base, UpscaleConfig(**IDENTITY_SETTINGS[name]))
    assert model.config.depth == base.config.depth + len(inserted) and inserted
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids()), base(ids()), rtol=0, atol=1e-6)
        # Cached decoding goes through the new blocks too.
        cache = model.new_cache(2, 12)
        pieces = [model(ids()[:, :8], cache, 0)] + [model(ids()[:, i : i + 1], cache, i) for i in range(8, 12)]
        torch.testing.assert_close(torch.cat(pieces, 1), base(ids()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", OTHER_METHODS)
def test_a_method_that_claims_no_identity_changes_the_function(name: str) -> None:
    # The other half of the claim: registering identity_at_insertion=False for an identity would
    # leave the method out of the test above.
    base = base_model()
    model, _ = upscale(base, UpscaleConfig(**REGISTERED_DEFAULTS, method=name))
    with torch.no_grad():
        assert (model.eval()(ids()) - base(ids())).abs().max() > 1e-3


def test_an_unknown_method_is_refused_naming_the_field_and_every_registered_name() -> None:
    expected = r"model\.upscale\.method='solar' is not a registered up-scaling method; expected one of none, "
    with pytest.raises(ValueError, match=expected) as error:
        UpscaleConfig(method="solar")
    assert str(error.value).endswith(", ".join(method_names()))
    assert method_names()[0] == "none" and {method.name for method in registered_methods()} == set(method_names()[1:])


def test_a_method_name_is_registered_once_and_none_is_reserved() -> None:
    def another_plan(base, settings):
        raise AssertionError("never called")

    before = registered_methods()
    with pytest.raises(ValueError, match=r"method 'midus' is registered twice \(memory_plan, another_plan\)"):
        register_upscale("midus", identity_at_insertion=True)(another_plan)
    with pytest.raises(ValueError, match=r"'none' is reserved"):
        register_upscale("none", identity_at_insertion=True)(another_plan)
    assert registered_methods() == before  # nothing was added or replaced


def test_the_method_field_docstring_lists_every_registered_method() -> None:
    # `--help` shows the field's docstring (the type is a plain str checked against the registry).
    fields = ast.parse(inspect.getsource(UpscaleConfig)).body[0].body
    method = next(i for i, node in enumerate(fields) if isinstance(node, ast.AnnAssign) and node.target.id == "method")
    docstring = fields[method + 1].value.value
    missing = [name for name in method_names() if f"``{name}``" not in docstring]
    assert not missing, f"UpscaleConfig.method's docstring does not list {missing}"


def test_interleaved_copies_sit_after_their_source_and_only_their_output_projections_are_zero() -> None:
    base = base_model()
    model, inserted = upscale(base, UpscaleConfig(method="dus_interleave", every=2))
    assert inserted == [2, 5]  # T0 T1 C1 T2 T3 C3
    copy, source = model.blocks[2], base.blocks[1]
    assert torch.equal(copy.attn.q_proj.weight, source.attn.q_proj.weight)
    assert torch.equal(copy.branch.up_proj.weight, source.branch.up_proj.weight)
    assert not copy.attn.o_proj.weight.any() and not copy.branch.down_proj.weight.any()


def test_solar_stacking_drops_blocks_at_the_seam() -> None:
    base = base_model(n_layers=6)
    model, inserted = upscale(base, UpscaleConfig(method="dus_solar", drop=2))
    assert model.config.depth == 8 and inserted == [4, 5, 6, 7]
    sources = [0, 1, 2, 3, 2, 3, 4, 5]  # first copy without its last 2, second without its first 2
    for new, old in enumerate(sources):
        assert torch.equal(model.blocks[new].attn.k_proj.weight, base.blocks[old].attn.k_proj.weight)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(ids()), base(ids()))  # SOLAR changes the function


def test_midus_attention_is_copied_from_the_block_it_follows_or_random() -> None:
    base = base_model()
    copied, _ = upscale(base, UpscaleConfig(method="midus", positions=[2], memory=MEMORY))
    random, _ = upscale(base, UpscaleConfig(method="midus", positions=[2], attn_init="random", memory=MEMORY))
    assert type(copied.blocks[3]).__name__ == "MemoryBlock" and copied.blocks[3].attn.o_proj is None
    assert torch.equal(copied.blocks[3].attn.v_proj.weight, base.blocks[2].attn.v_proj.weight)
    assert torch.equal(copied.blocks[3].attn_norm.weight, base.blocks[2].attn_norm.weight)
    assert not torch.equal(random.blocks[3].attn.v_proj.weight, base.blocks[2].attn.v_proj.weight)
    assert not copied.blocks[3].branch.values.weight.any()  # zero values: the identity
    full_attention = {**MEMORY, "attn_output_projection": True}
    full, _ = upscale(base, UpscaleConfig(method="midus", positions=[2], memory=full_attention))
    assert torch.equal(full.blocks[3].attn.o_proj.weight, base.blocks[2].attn.o_proj.weight)  # W_O copied too


@pytest.mark.parametrize("policy", ["new", "new_and_norms"])
def test_frozen_parameters_receive_no_update(policy: str) -> None:
    base = base_model()
    model, inserted = upscale(base, UpscaleConfig(method="midus", every=2, memory=MEMORY))
    apply_trainable(model, inserted, policy)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay=0.1), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model.train()(ids()).logsumexp(-1).mean().backward()
        optimizer.step()
    for name, parameter in model.named_parameters():
        new_block = any(name.startswith(f"blocks.{index}.") for index in inserted)
        trains = new_block or (policy == "new_and_norms" and "norm" in name)
        assert parameter.requires_grad == trains, name
        if not trains:
            assert torch.equal(parameter, before[name]), f"{name} moved although frozen"
    assert not torch.equal(
        model.blocks[inserted[0]].attn.q_proj.weight, before[f"blocks.{inserted[0]}.attn.q_proj.weight"]
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "dus_interleave", "positions": [4]}, r"positions\[0\]=4 is out of range: the base has 4 blocks"),
        ({"method": "midus", "every": 2, "positions": [1]}, r"give exactly one of `every`"),
        ({"method": "dus_solar", "drop": 4}, r"drop=4 must be in 0..3"),
        ({"method": "dus_top", "top_blocks": 0}, r"top_blocks=0 must be in 1..4"),
        ({"method": "midus", "positions": [1, 1], "memory": MEMORY}, r"lists a block twice"),
    ],
)
def test_bad_upscale_settings_name_the_field(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        upscale(base_model(), UpscaleConfig(**settings))


def test_two_memory_blocks_in_a_row_are_refused_unless_allowed() -> None:
    base = base_model(memory_layers=[1], memory=MEMORY)  # T M T T
    settings = dict(method="midus", positions=[0], memory=MEMORY)
    with pytest.raises(ValueError, match=r"memory blocks at 1 and 2 in a row; .*allow_adjacent_memory"):
        upscale(base, UpscaleConfig(**settings))
    model, _ = upscale(base, UpscaleConfig(**settings, allow_adjacent_memory=True))
    assert [spec.block for spec in model.config.stack] == [
        "transformer",
        "memory",
        "memory",
        "transformer",
        "transformer",
    ]


def test_base_sources_fail_with_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=r"nope.ckpt' does not exist; it is made by: python -m midus fit"):
        load_base(str(missing), "python -m midus fit --config experiments/pretrain_base.yaml")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt.ckpt' is not a readable checkpoint"):
        load_base(str(corrupt))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(ValueError, match=r"was not written by the kit's fit"):
        load_base(str(foreign))
    empty_hf = tmp_path / "hf"
    empty_hf.mkdir()
    (empty_hf / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileNotFoundError, match=r"no weight files; looked for model.safetensors"):
        load_base(str(empty_hf))


def test_checkpoints_from_before_the_config_was_stored_load_only_when_unambiguous(tmp_path: Path) -> None:
    """Issue-3 runs kept the architecture only in the hyperparameters; for a from-scratch run
    that is the model, for an up-scaled one it is not (the surgery changed it)."""
    import dataclasses

    config = ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, memory_layers=[1], memory_branch="hml")
    model = MidusLM(config)
    state = {f"model.{name}": value for name, value in model.state_dict().items()}
    legacy = tmp_path / "legacy.ckpt"
    torch.save(
        {"hyper_parameters": {"config": dataclasses.asdict(config), "pretrained": ""}, "state_dict": state}, legacy
    )
    ids = torch.randint(0, 40, (1, 6))
    assert torch.equal(load_base(str(legacy))(ids), model(ids))
    as_dataclass = tmp_path / "config_as_dataclass.ckpt"  # issue-4 runs stored the dataclass itself
    torch.save({"midus_model_config": config, "state_dict": state}, as_dataclass)
    assert torch.equal(load_base(str(as_dataclass))(ids), model(ids))
    upscaled = tmp_path / "legacy_upscaled.ckpt"
    hyper = {"config": dataclasses.asdict(config), "pretrained": "", "upscale": {"method": "midus"}}
    torch.save({"hyper_parameters": hyper, "state_dict": state}, upscaled)
    with pytest.raises(ValueError, match=r"was not written by the kit's fit"):
        load_base(str(upscaled))


@pytest.mark.parametrize("settings", [{"method": "dus_solar", "drop": 1}, {"method": "dus_interleave", "every": 2}])
def test_a_dus_model_exports_to_hugging_face_with_identical_logits(settings: dict, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from midus.checkpoint.hf_export import export_hf_checkpoint

    model, _ = upscale(base_model(), UpscaleConfig(**settings))
    with torch.no_grad():  # move the zeroed projections, so the parity covers every weight
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    export_hf_checkpoint(model, tmp_path / "hf")
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids()).logits, model.eval()(ids()), rtol=1e-5, atol=1e-5)


def test_a_random_bank_with_zero_projections_is_the_identity_whose_projections_train_first() -> None:
    # memory.zero_init_head_proj with zero_init_values false: P_h starts at 0, the bank random.
    base = base_model()
    memory = {**MEMORY, "zero_init_values": False, "zero_init_head_proj": True}
    model, inserted = upscale(base, UpscaleConfig(method="midus", positions=[1], memory=memory))
    branch = model.blocks[inserted[0]].branch
    assert not branch.head_proj.any() and branch.values.weight.any()
    model.train()(ids()).logsumexp(-1).mean().backward()
    assert branch.head_proj.grad.abs().sum() > 0  # the projections learn from step one ...
    assert not branch.values.weight.grad.any()  # ... the bank once they are no longer zero
    with pytest.raises(ValueError, match="zero_init_head_proj needs memory.values=hive"):
        upscale(base, UpscaleConfig(method="midus", positions=[1], memory={**memory, "values": "per_head"}))


def test_a_zero_output_gate_is_the_identity_whose_gate_trains_first() -> None:
    # memory.output_gate: M(x) = x + g * branch(...), g = 0 at insertion, the memory random.
    base = base_model()
    memory = {**MEMORY, "zero_init_values": False, "output_gate": True}
    model, inserted = upscale(base, UpscaleConfig(method="midus", positions=[1], memory=memory))
    block = model.blocks[inserted[0]]
    assert block.output_gate.shape == (base.config.d_model,) and not block.output_gate.any()
    assert block.branch.values.weight.any() and block.branch.head_proj.any()
    model.train()(ids()).logsumexp(-1).mean().backward()
    assert block.output_gate.grad.abs().sum() > 0  # the gate learns from step one ...
    assert not block.branch.values.weight.grad.any()  # ... the memory once the gate is open
    with torch.no_grad():  # an open gate scales the branch's update channel by channel
        x = torch.randn(2, 12, base.config.d_model)
        rope = model.rotary(torch.arange(12), x.dtype)
        gate = torch.rand(base.config.d_model)
        block.output_gate.copy_(gate)
        gated = block(x, rope) - x
        block.output_gate = None  # the ungated block: x + branch(...)
        torch.testing.assert_close(gated, (block(x, rope) - x) * gate, rtol=1e-6, atol=1e-6)
    assert gated.abs().sum() > 0


@pytest.mark.parametrize("knob", ["zero_init_head_proj", "output_gate"])
def test_an_init_whose_two_factors_are_zero_is_refused_before_anything_is_built(knob: str) -> None:
    expected = rf"memory.{knob} with memory.zero_init_values=true .* neither ever gets a gradient"
    with pytest.raises(ValueError, match=expected):
        upscale(base_model(), UpscaleConfig(method="midus", positions=[1], memory={**MEMORY, knob: True}))
