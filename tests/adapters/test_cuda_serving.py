"""The serving engine and QLoRA on a CUDA GPU (skipped without one): in the dtype the engine serves in on the GPU,
its logits equal PEFT's for every method; a 4-bit (bitsandbytes NF4) base trains LoRA on our training path and
the engine serves the result on a 4-bit base as PEFT does."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from adapters.base_models import load_model
from adapters.compute import serving_dtype
from adapters.data import encode_dataset, parse_jsonl
from adapters.engine import AdapterRef, BaseRuntime
from adapters.methods import METHODS
from tests.adapters.test_engine import BASE_INFO, PROMPT, _Settings, trained  # noqa: F401 (a fixture)
from tests.adapters.test_model_memory import close_in_low_precision, peft_logits
from tests.conftest import chat_lines
from workers.training.checkpoints import save_adapter
from workers.training.loop import TrainingCallbacks, TrainingConfig, TrainingRecipe

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_engine_matches_peft_in_the_gpu_serving_dtype(method: str, trained: dict[str, Path],  # noqa: F811
                                                      tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    dtype = serving_dtype("cuda")
    assert dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    runtime = BaseRuntime(load_model(str(tiny_model_dir), device="cuda", dtype=dtype), tiny_tokenizer,
                          cache_size=2, max_rank=64)
    try:
        ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        adapter = runtime.adapters.load(AdapterRef(key=method, folder=trained[method], base_model="tiny"))
        reference = PeftModel.from_pretrained(load_model(str(tiny_model_dir), device="cuda", dtype=dtype),
                                              str(trained[method])).eval()
        ours = runtime.logits(ids, adapter)
        assert ours.device.type == "cuda" and ours.dtype == getattr(torch, dtype)
        close_in_low_precision(ours, peft_logits(reference, ids, "cuda"))
        assert (ours.float() - runtime.logits(ids, None).float()).abs().max() > 0.05, "the adapter changes nothing"
    finally:
        runtime.close()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_trains_on_a_4bit_base_and_is_served_on_one(tiny_model_dir: Path, tiny_tokenizer: Any,
                                                          tmp_path: Path) -> None:
    compute = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    base = load_model(str(tiny_model_dir), device="cuda", dtype=compute, quantization="4bit")
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    method = METHODS["lora"]
    examples = encode_dataset(tiny_tokenizer, parse_jsonl(chat_lines(8).encode(), max_examples=100))
    hp = method.resolve({"learning_rate": 0.05, "n_epochs": 2, "batch_size": 4}, n_examples=8, settings=_Settings(),
                        base_info=BASE_INFO)
    frozen = [(p, p.detach().clone()) for p in base.parameters()]  # PEFT wraps these same tensors
    losses: list[float] = []
    model, _result = TrainingRecipe(
        TrainingConfig(method=method, hyperparameters=hp, seed=3, pad_id=tiny_tokenizer.pad_token_id,
                       compute_dtype=compute),
        base_model=base, train_examples=examples,
        callbacks=TrainingCallbacks(on_metrics=lambda m: losses.append(m["train_loss"]))).run()
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    trained_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained_names and all(".lora_" in n for n in trained_names), sorted(trained_names)[:5]
    assert all(float(p.abs().max()) > 0 for n, p in model.named_parameters() if ".lora_B." in n)  # B starts at 0
    assert all(torch.equal(param.detach(), before) for param, before in frozen), "the 4-bit base moved"
    save_adapter(model, tmp_path / "qlora", method)

    runtime = BaseRuntime(load_model(str(tiny_model_dir), device="cuda", dtype=compute, quantization="4bit"),
                          tiny_tokenizer, cache_size=2, max_rank=64)
    try:
        ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        adapter = runtime.adapters.load(AdapterRef(key="qlora", folder=tmp_path / "qlora", base_model="tiny"))
        reference = PeftModel.from_pretrained(
            load_model(str(tiny_model_dir), device="cuda", dtype=compute, quantization="4bit"),
            str(tmp_path / "qlora")).eval()
        ours = runtime.logits(ids, adapter)
        close_in_low_precision(ours, peft_logits(reference, ids, "cuda"))
        assert (ours.float() - runtime.logits(ids, None).float()).abs().max() > 0.05, "the adapter changes nothing"
    finally:
        runtime.close()
