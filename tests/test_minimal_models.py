"""The speed benchmark's minimal models are what it says they are (benchmarks/minimal_models.py).

small_model_speed.py reads the cost of the Llama architecture off ``minimal-llama / minimal`` and
the cost of each Llama part off ``+rmsnorm``/``+rope``/``+swiglu`` against ``minimal``; those
ratios mean that only if the plain Llama computes the kit model's function and each variant
differs from nanoGPT in its one part.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from midus.model import MidusLM
from midus.model.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from minimal_models import MinimalGPT, MinimalLlama  # noqa: E402

VOCAB, WIDTH, LAYERS, HEADS, BLOCK = 67, 64, 2, 4, 32


def test_the_plain_llama_computes_the_kit_models_logits() -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=WIDTH, n_layers=LAYERS, n_heads=HEADS, branch="ffn",
                         tie_embeddings=True)
    kit = MidusLM(config).eval()
    plain = MinimalLlama(VOCAB, WIDTH, LAYERS, HEADS, config.ffn_width, BLOCK).eval()
    names = {"wte": "embed", "ln_f": "norm"}  # nanoGPT's names -> the kit's
    for block in (f"blocks.{index}" for index in range(LAYERS)):
        names |= {f"{block}.ln_1": f"{block}.attn_norm", f"{block}.ln_2": f"{block}.branch_norm",
                  f"{block}.c_proj": f"{block}.attn.o_proj"}
        names |= {f"{block}.{p}": f"{block}.attn.{p}_proj" for p in "qkv"}
        names |= {f"{block}.{p}": f"{block}.branch.{p}_proj" for p in ("gate", "up", "down")}
    kit_weights = dict(kit.named_parameters())
    with torch.no_grad():
        for name, parameter in plain.named_parameters():
            parameter.copy_(kit_weights[names[name.removesuffix(".weight")] + ".weight"])
    ids = torch.randint(0, VOCAB, (3, BLOCK))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), kit(ids), rtol=1e-4, atol=1e-5)


def per_block(*names: str) -> set[str]:
    return {f"blocks.{index}.{name}" for index in range(LAYERS) for name in names}


@pytest.mark.parametrize("part, removed, added", [
    (dict(norm="rms"), set(), set()),
    (dict(positions="rope"), {"wpe"}, set()),
    (dict(mlp="swiglu", hidden=96), per_block("c_fc", "mlp_proj"), per_block("gate", "up", "down")),
])
def test_each_variant_swaps_one_part_of_nanogpt_and_stays_causal(part, removed, added) -> None:
    torch.manual_seed(0)
    base = dict(MinimalGPT(VOCAB, WIDTH, LAYERS, HEADS, BLOCK).named_modules())
    variant = MinimalGPT(VOCAB, WIDTH, LAYERS, HEADS, BLOCK, **part)
    modules = dict(variant.named_modules())
    assert (set(base) - set(modules), set(modules) - set(base)) == (removed, added)
    norms = [name for name, module in base.items() if isinstance(module, torch.nn.LayerNorm)]
    expected_norm = torch.nn.RMSNorm if "norm" in part else torch.nn.LayerNorm
    assert len(norms) == 2 * LAYERS + 1 and all(isinstance(modules[name], expected_norm) for name in norms)
    ids = torch.randint(0, VOCAB, (2, BLOCK))
    changed = ids.clone()
    changed[:, 20] = (changed[:, 20] + 1) % VOCAB
    with torch.no_grad():
        before, after = variant(ids), variant(changed)
    assert torch.equal(before[:, :20], after[:, :20])  # no position sees a later token
    assert not torch.equal(before[:, 20:], after[:, 20:])


def test_rotary_positions_make_the_variant_order_aware_without_a_position_table() -> None:
    torch.manual_seed(0)
    model = MinimalGPT(VOCAB, WIDTH, LAYERS, HEADS, BLOCK, positions="rope")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        # The last token's logits depend on the order of the earlier ones only through the rotation.
        assert not torch.allclose(model(ids)[0, -1], model(ids[:, [1, 0, 2, 3]])[0, -1])
