"""The slot bank's shared A factors: sibling projections (q/k/v, gate/up) multiply their input once, and every
projection still adds exactly its own row's x·Aᵀ·Bᵀ, whatever inputs the model hands each sibling."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapters.engine.slot_bank import SlotBank
from adapters.methods import ChannelScale, LoraFactors, ServingKind, ServingWeights

TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(config).eval()


def random_lora(bank: SlotBank, rank: int, scale: float = 0.5) -> ServingWeights:
    factors = {name: LoraFactors(a=torch.randn(rank, hooked.in_features), b=torch.randn(hooked.out_features, rank),
                                 scale=scale)
               for name, hooked in bank.modules.items()}
    return ServingWeights(kind=ServingKind.LOW_RANK, rank=rank, low_rank=factors)


def expected(module: torch.nn.Module, x: torch.Tensor, factors: LoraFactors | None) -> torch.Tensor:
    """The plain projection plus this adapter's correction, computed the textbook way."""
    with torch.no_grad():
        base = torch.nn.functional.linear(x, module.weight, module.bias)
        return base if factors is None else base + factors.scale * (x @ factors.a.T @ factors.b.T)


def test_siblings_share_one_a_tensor_and_other_projections_have_their_own(model: LlamaForCausalLM) -> None:
    bank = SlotBank(model, TARGETS, n_slots=2)
    shared = {name.rsplit(".", 1)[-1]: id(hooked.shared) for name, hooked in bank.modules.items()}
    assert shared["q_proj"] == shared["k_proj"] == shared["v_proj"]
    assert shared["gate_proj"] == shared["up_proj"]
    assert len({shared["q_proj"], shared["o_proj"], shared["gate_proj"], shared["down_proj"]}) == 4
    assert len(bank.shared) == 4  # one layer: q/k/v, o, gate/up, down


@pytest.mark.parametrize("rows", [[1, 2], [2, 2], [2, 1], [1, 0]], ids=["slice", "single", "gather", "with-base"])
def test_each_sibling_adds_its_own_rows_correction_even_when_its_input_differs(
        model: LlamaForCausalLM, rows: list[int]) -> None:
    bank = SlotBank(model, TARGETS, n_slots=2, rank=4)
    adapters = {1: random_lora(bank, 4), 2: random_lora(bank, 4)}
    for slot, weights in adapters.items():
        bank.write(slot, weights)
    attention = model.model.layers[0].self_attn
    x = torch.randn(len(rows), 3, 64)
    other = torch.randn(len(rows), 3, 64)  # k_proj gets an input of its own: no shared product for it
    with torch.no_grad(), bank.route(rows):
        got = {"q_proj": attention.q_proj(x), "k_proj": attention.k_proj(other), "v_proj": attention.v_proj(x),
               "q_proj again": attention.q_proj(x)}
    for label, tensor in got.items():
        name = label.split()[0]
        source = other if name == "k_proj" else x
        module = getattr(attention, name)
        for i, slot in enumerate(rows):
            factors = adapters[slot].low_rank[f"model.layers.0.self_attn.{name}"] if slot else None
            torch.testing.assert_close(tensor[i], expected(module, source[i], factors), rtol=1e-5, atol=1e-5)
    assert all(shared._input is None for shared in bank.shared)  # nothing held after the forward pass


def test_a_rank_grown_by_a_later_adapter_keeps_the_earlier_ones_factors(model: LlamaForCausalLM) -> None:
    bank = SlotBank(model, TARGETS, n_slots=2, rank=2)
    small, large = random_lora(bank, 2), random_lora(bank, 6)
    bank.write(1, small)
    bank.write(2, large)  # grows every projection to rank 6
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, 64)
    with torch.no_grad(), bank.route([1, 2]):
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    for name, tensor in (("gate_proj", gate), ("up_proj", up)):
        for i, weights in enumerate((small, large)):
            factors = weights.low_rank[f"model.layers.0.mlp.{name}"]
            torch.testing.assert_close(tensor[i], expected(getattr(mlp, name), x[i], factors), rtol=1e-5, atol=1e-5)


def test_an_input_scaled_sibling_in_a_mixed_batch_gets_its_scaled_input(model: LlamaForCausalLM) -> None:
    """IA³ on up_proj's input makes up_proj's input a new tensor, unlike gate_proj's: up_proj's low-rank rows
    must use that input, not gate_proj's product."""
    bank = SlotBank(model, TARGETS, n_slots=2, rank=4)
    lora = random_lora(bank, 4)
    vector = torch.rand(64) + 0.5
    bank.write(1, lora)
    bank.write(2, ServingWeights(kind=ServingKind.SCALING,
                                 scales={"model.layers.0.mlp.up_proj": ChannelScale(vector=vector, side="input")}))
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, 64)
    with torch.no_grad(), bank.route([1, 2]):
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    factors = {n: lora.low_rank[f"model.layers.0.mlp.{n}"] for n in ("gate_proj", "up_proj")}
    torch.testing.assert_close(gate[0], expected(mlp.gate_proj, x[0], factors["gate_proj"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up[0], expected(mlp.up_proj, x[0], factors["up_proj"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gate[1], expected(mlp.gate_proj, x[1], None), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up[1], expected(mlp.up_proj, x[1] * vector, None), rtol=1e-5, atol=1e-5)
