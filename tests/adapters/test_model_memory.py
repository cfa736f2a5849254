"""Base models against the memory they need and the dtype they are held in: a model that does not fit is refused
before loading with both figures; the serving dtype follows the device (on a CPU, its measured compute plan); a
quantised base needs CUDA; a model held in bf16 serves every method as PEFT does in bf16 (the dtype of a GPU and of
a CPU with AMX)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters import compute
from adapters.base_models import load_model
from adapters.compute import ComputePlan, serving_dtype
from adapters.engine import AdapterRef, BaseRuntime
from adapters.methods import METHODS
from adapters.model_memory import GIB, HEADROOM, ModelTooLarge, check_fits, parameter_count, weight_bytes
from tests.adapters.test_engine import PROMPT, trained  # noqa: F401 (a fixture)


def test_parameters_and_bytes_come_from_the_headers(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert parameter_count(tiny_model_dir) == sum(p.numel() for p in model.parameters())
    fp32, bf16 = weight_bytes(tiny_model_dir, "float32"), weight_bytes(tiny_model_dir, "bfloat16")
    assert fp32 == 4 * parameter_count(tiny_model_dir) and bf16 == fp32 // 2
    # 4-bit: the projections at half a byte a weight, embeddings, head and norms stay in the compute dtype.
    projections = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.startswith("lm_head"))
    assert weight_bytes(tiny_model_dir, "bfloat16", "4bit") == bf16 - math.ceil(1.5 * projections)


def test_a_model_that_does_not_fit_is_refused_with_both_figures(tiny_model_dir: Path) -> None:
    needed = weight_bytes(tiny_model_dir, "float32")
    with pytest.raises(ModelTooLarge) as refused:
        check_fits(tiny_model_dir, device="cpu", dtype="float32", free=needed)  # no room for the KV cache
    message = str(refused.value)
    assert f"{needed / GIB:.2f} GiB" in message and f"{needed / GIB:.2f} GiB free" in message and "float32" in message
    figures = check_fits(tiny_model_dir, device="cpu", dtype="float32", free=int(needed * HEADROOM) + 1)
    assert figures["weight_bytes"] == needed


def test_load_model_checks_before_reading_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("adapters.model_memory.free_bytes", lambda device: 1024)
    loaded: list[Any] = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(ModelTooLarge, match="cpu has 0.00 GiB free"):
        load_model(str(tiny_model_dir), device="cpu")
    assert loaded == []


def close_in_low_precision(ours: torch.Tensor, expected: torch.Tensor, without: torch.Tensor | None = None) -> None:
    """Two correct implementations in bf16/fp16 round differently: within 3 % of the largest logit, and the
    same direction (cosine >= 0.999). With `without` (the base model's logits), also much closer to `expected`
    than the adapter's own effect, so that an adapter applied wrongly or not at all cannot pass."""
    ours, expected = ours.float(), expected.float()
    worst = float((ours - expected).abs().max())
    assert worst <= 0.03 * float(expected.abs().max()), worst
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), expected.flatten(), dim=0)
    assert float(cosine) >= 0.999, float(cosine)
    if without is not None:
        effect = float((expected - without.float()).abs().max())
        assert worst <= 0.2 * effect, (worst, effect)


def peft_logits(model: Any, ids: list[int], device: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device))
    return out.logits[0, -len(ids):]  # virtual-token methods also return their virtual positions


@pytest.mark.parametrize("measured", ["bfloat16", "float32"])
def test_a_cpu_serves_in_the_dtype_its_compute_plan_measured(measured: str, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """On a CPU "auto" serves in what the probe measured (bf16 only where native and faster): the same plan
    training uses, cached in the data directory. A named dtype is taken as it is, without a probe."""
    probes: list[str] = []

    def probe() -> ComputePlan:
        probes.append("cpu")
        return ComputePlan(measured, f"{measured}: measured")

    monkeypatch.setattr(compute, "_probe_cpu", probe)
    compute.compute_plan.cache_clear()
    try:
        assert serving_dtype("cpu", "auto", tmp_path) == measured
        compute.compute_plan.cache_clear()
        assert serving_dtype("cpu", "auto", tmp_path) == measured and probes == ["cpu"]  # the second from the file
        assert serving_dtype("cpu", "float32") == "float32" and serving_dtype("cpu", "bfloat16") == "bfloat16"
        assert probes == ["cpu"]
    finally:
        compute.compute_plan.cache_clear()


def test_quantisation_needs_cuda(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        load_model(str(tiny_model_dir), device="cpu", quantization="4bit")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_bf16_base_serves_every_method_as_peft_does(method: str, trained: dict[str, Path],  # noqa: F811
                                                      tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """The dtype a GPU serves in, and a CPU with AMX: the engine's logits on a bf16 base equal PEFT's on the same
    bf16 base, within bf16's rounding. Adapter weights kept in float32 (a prefix's keys and values) must take the
    model's dtype, or attention fails on mixed dtypes (found on an H200: prefix tuning raised at the first chat)."""
    runtime = BaseRuntime(load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16"), tiny_tokenizer,
                          cache_size=2, max_rank=64)
    try:
        ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        adapter = runtime.adapters.load(AdapterRef(key=method, folder=trained[method], base_model="tiny"))
        ours = runtime.logits(ids, adapter)
        assert ours.dtype == torch.bfloat16 and bool(torch.isfinite(ours).all())
        reference = PeftModel.from_pretrained(load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16"),
                                              str(trained[method])).eval()
        close_in_low_precision(ours, peft_logits(reference, ids, "cpu"), without=runtime.logits(ids, None))
    finally:
        runtime.close()


def test_a_bf16_prefill_computes_the_output_head_as_one_matmul(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """A prefill keeps the last position's logits only: a strided slice that the head would compute as a batched
    matmul, which in bf16 on a CPU first copies the whole transposed vocabulary matrix (140 ms for SmolLM2's
    against 7 ms for the product). The engine hands the head a tensor of its own, so no batched matmul runs."""
    from torch.profiler import ProfilerActivity, profile

    from adapters.engine import SamplingParams
    from adapters.engine.sequence import Sequence

    runtime = BaseRuntime(load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16"), tiny_tokenizer,
                          cache_size=2, max_rank=64)
    vocabulary = runtime.model.config.vocab_size

    def prefill_profiled() -> tuple[Sequence, list[Any]]:  # on the scheduler thread, where the engine runs it
        sequence = Sequence(tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"], None,
                            SamplingParams(max_tokens=1, temperature=0.0), tiny_tokenizer)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiled:
            runtime._prefill([sequence])
        return sequence, [(e.name, e.input_shapes) for e in profiled.events()]

    try:
        sequence, events = runtime.call(prefill_profiled)
        assert len(sequence.produced) == 1
        head = [(name, shapes) for name, shapes in events if any(vocabulary in shape for shape in shapes)]
        assert head and all(name != "aten::bmm" for name, _ in head), head
    finally:
        runtime.close()


def test_a_bf16_mixed_batch_keeps_its_adapter_factors_in_float32_on_a_cpu(
        trained: dict[str, Path], tiny_model_dir: Path, tiny_tokenizer: Any) -> None:  # noqa: F811
    """On a CPU a bf16 model's low-rank factors stay float32 (bf16 matmuls that small cost 3x as much there); the
    rows of a mixed batch (two low-rank adapters, IA3 and the base model, prefilled in one pass) still give each
    adapter's PEFT logits on the same bf16 base."""
    from adapters.engine import SamplingParams
    from tests.adapters.test_engine import scheduler_paused

    runtime = BaseRuntime(load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16"), tiny_tokenizer,
                          cache_size=4, max_rank=64)
    try:
        assert runtime.bank.factor_dtype == torch.float32 and runtime.bank.dtype == torch.bfloat16
        keys = ["lora", "adalora", "ia3", None]
        loaded = {key: runtime.adapters.load(AdapterRef(key=key, folder=trained[key], base_model="tiny"))
                  for key in keys if key is not None}
        ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        with scheduler_paused(runtime):  # all four wait, so they are prefilled together
            sequences = [runtime.submit(ids, loaded.get(key) if key else None,
                                        SamplingParams(max_tokens=2, temperature=0), record_logits=True)
                         for key in keys]
        plain = peft_logits(load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16"), ids, "cpu")
        for key, sequence in zip(keys, sequences, strict=True):
            sequence.wait()
            assert sequence.logits is not None
            base = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
            reference = PeftModel.from_pretrained(base, str(trained[key])).eval() if key else base
            close_in_low_precision(sequence.logits[0], peft_logits(reference, ids, "cpu"),
                                   without=plain if key else None)
    finally:
        runtime.close()
