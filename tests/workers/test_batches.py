"""The training path that skips padding and unlabelled positions computes exactly the plain path's loss and
gradients, for every registered method (the plain path: right-padded batch, labels, `model(...).loss`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adapters.base_models import base_info
from adapters.data import EncodedExample
from adapters.methods import METHODS
from app.settings import Settings
from workers.training.batches import (
    CPU_FP32_ATTENTION_MAX_TOKENS,
    SDPA_ATTENTION,
    batch_loss,
    packed_attention,
    packed_batch,
    padded_batch,
    use_attention,
    use_packed_attention,
)
from workers.training.loop import BatchMaker

IGNORE = -100


def plain_batch(examples: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """The plain Hugging Face way: right-padded rows, labels -100 on padding and untrained tokens."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        labels[row, :n] = torch.tensor([t if m else IGNORE for t, m in zip(example.input_ids, example.loss_mask,
                                                                            strict=True)])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def peft_model(name: str, tiny_model_dir: Path) -> tuple[Any, dict[str, Any]]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    method = METHODS[name]
    hp = method.resolve({}, n_examples=8, settings=Settings(), base_info=base_info(str(tiny_model_dir)))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), method.peft_config(hp, total_steps=4))
    with torch.no_grad():  # away from the initial values, some of which make a method a no-op
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.train(), hp


def gradients(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_and_gradients_equal_the_plain_path(name: str, examples: list[EncodedExample], tiny_model_dir: Path,
                                                 tiny_tokenizer: Any) -> None:
    method = METHODS[name]
    model, hp = peft_model(name, tiny_model_dir)
    model.eval()  # no dropout: the two paths must see the same function
    plain = model(**plain_batch(examples, tiny_tokenizer.pad_token_id)).loss  # PEFT adds AdaLoRA's penalty here
    plain.backward()
    expected = gradients(model)

    make = BatchMaker.for_training(method, hp, tiny_tokenizer.pad_token_id)
    use_attention(model.base_model.model, make.attention)
    batch = make(examples)
    ours = batch_loss(model, batch)
    extra = method.regularisation(model)
    if extra is not None:
        ours = ours + extra
    ours.backward()
    got = gradients(model)
    assert abs(float(ours) - float(plain)) < 1e-4, (float(ours), float(plain))
    assert got.keys() == expected.keys() and got
    for key in got:
        assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=1e-4), key
    # Packing: the row holds exactly the real tokens, no padding at all.
    assert batch.real_tokens == sum(len(e.input_ids) for e in examples)
    if make.packed:
        assert batch.inputs["input_ids"].shape == (1, batch.real_tokens)


class AttentionDtypes(TorchDispatchMode):
    """Records the query dtype of every scaled-dot-product attention call (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if "scaled_dot_product" in func.name():
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_short_examples_attend_in_float32_on_cpu_under_bf16() -> None:
    """On CPU a bf16 packed example up to CPU_FP32_ATTENTION_MAX_TOKENS long attends in float32 (PyTorch's bf16 flash
    kernel takes several times as long there); a longer one keeps the bf16 kernel. Each example's output is its own
    causal attention, as before, only computed in float32 where it is short."""
    import torch.nn.functional as F  # noqa: N812

    module = torch.nn.Module()
    module.num_key_value_groups = 3  # type: ignore[assignment]
    module.eval()
    lengths = [5, CPU_FP32_ATTENTION_MAX_TOKENS, CPU_FP32_ATTENTION_MAX_TOKENS + 1]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, sum(lengths), 16, generator=generator).bfloat16() for heads in (6, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16), AttentionDtypes() as seen:
        out, _ = packed_attention(module, q, k, v, None, cu_seq_lens_q=bounds)
    assert seen.dtypes == [torch.float32, torch.float32, torch.bfloat16]
    assert out.dtype == torch.bfloat16 and out.shape == (1, sum(lengths), 6, 16)
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        segment = [t[:, :, start:end] for t in (q, k, v)]
        if end - start <= CPU_FP32_ATTENTION_MAX_TOKENS:
            segment = [t.float() for t in segment]
        expected = F.scaled_dot_product_attention(*segment, is_causal=True, enable_gqa=True).bfloat16()
        torch.testing.assert_close(out[:, start:end], expected.transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_padded_rows_attend_in_float32_on_cpu_under_bf16(name: str, examples: list[EncodedExample],
                                                         tiny_model_dir: Path, tiny_tokenizer: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The methods that cannot pack train on padded rows through sdpa_attention: under bf16 autocast on CPU, rows up
    to CPU_FP32_ATTENTION_MAX_TOKENS keys (virtual tokens included) attend in float32, forward and backward, and the
    loss is the float32 one up to bf16 rounding; with the limit below the rows' length, the bf16 kernel runs."""
    from workers.training import batches

    model, hp = peft_model(name, tiny_model_dir)
    model.eval()
    batch = BatchMaker.for_training(METHODS[name], hp, tiny_tokenizer.pad_token_id)(examples)
    use_attention(model.base_model.model, SDPA_ATTENTION)
    float32_loss = float(batch_loss(model, batch))

    def bf16_attention() -> tuple[float, set[torch.dtype]]:
        with torch.autocast("cpu", dtype=torch.bfloat16), AttentionDtypes() as seen:
            loss = batch_loss(model, batch)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss), set(seen.dtypes)

    loss, dtypes = bf16_attention()
    assert dtypes == {torch.float32}
    assert abs(loss - float32_loss) < 0.05 * float32_loss
    monkeypatch.setattr(batches, "CPU_FP32_ATTENTION_MAX_TOKENS", 1)
    assert bf16_attention()[1] == {torch.bfloat16}


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_sdpa_attention_in_float32_is_sdpa_on_float32_inputs(mask_kind: str) -> None:
    """sdpa_attention on bf16 inputs of a short, left-padded batch is transformers' SDPA attention on the same inputs
    in float32, with the same mask (boolean or additive), cast back to bf16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from workers.training.batches import sdpa_attention

    module = torch.nn.Module()
    module.num_key_value_groups = 3  # type: ignore[assignment]
    module.is_causal = True  # type: ignore[assignment]
    module.eval()
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, heads, 10, 16, generator=generator).bfloat16() for heads in (6, 2, 2))
    allowed = torch.ones(10, 10).tril().bool()[None, None].repeat(2, 1, 1, 1)
    allowed[0, :, :, :4] = False  # row 0: four padding positions in front
    allowed[0, :, :4, :4] = torch.eye(4, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
    mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -1e9).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sdpa_attention(module, q, k, v, mask)
    expected, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(),
                                         mask if mask_kind == "bool" else mask.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16(), rtol=0, atol=0)
    unmasked, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None)
    assert not torch.equal(out, unmasked.bfloat16())  # the mask was applied


def test_only_labelled_positions_reach_the_head(examples: list[EncodedExample]) -> None:
    packed = packed_batch(examples, max_len=1024)
    labelled = sum(sum(e.loss_mask[1:]) for e in examples)
    assert len(packed.keep) == len(packed.targets) == labelled < packed.real_tokens // 3
    padded = padded_batch(examples, max_len=1024, pad_id=0, offset=5)
    assert len(padded.targets) == labelled and int(padded.keep.min()) >= 5


def test_truncation_keeps_the_same_labels_on_both_paths(examples: list[EncodedExample]) -> None:
    packed, padded = packed_batch(examples, max_len=12), padded_batch(examples, max_len=12, pad_id=0)
    assert torch.equal(packed.targets, padded.targets)
    assert packed.real_tokens == padded.real_tokens == sum(min(12, len(e.input_ids)) for e in examples)


@pytest.mark.parametrize("name", ["lora", "prompt_tuning"])
def test_gradient_checkpointing_changes_no_loss_or_gradient(name: str, examples: list[EncodedExample],
                                                            tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """Recomputing activations in the backward pass (dropout included: its RNG state is replayed) gives the
    same loss and gradients as keeping them."""
    results = []
    for checkpointing in (False, True):
        model, hp = peft_model(name, tiny_model_dir)  # training mode, dropout on
        base = model.get_base_model()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert base.is_gradient_checkpointing
        make = BatchMaker.for_training(METHODS[name], hp, tiny_tokenizer.pad_token_id)
        if make.packed:
            use_packed_attention(base)
        torch.manual_seed(1)
        loss = batch_loss(model, make(examples))
        loss.backward()
        results.append((float(loss), gradients(model)))
    (plain_loss, plain_grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == pytest.approx(plain_loss, abs=1e-6)
    assert plain_grads.keys() == grads_ckpt.keys()
    for key, grad in plain_grads.items():
        torch.testing.assert_close(grads_ckpt[key], grad, atol=1e-5, rtol=1e-4)
