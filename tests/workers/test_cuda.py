"""The training path on a CUDA GPU (skipped without one): the same batches give the CPU's float32 loss, in the
compute dtype the GPU is given, and the compute plan picks bf16 where the GPU has it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.compute import compute_plan
from adapters.data import EncodedExample
from adapters.methods import METHODS
from tests.workers.test_batches import peft_model
from workers.training.batches import batch_loss, use_packed_attention
from workers.training.loop import BatchMaker, accelerator_for

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_compute_plan_on_cuda(tmp_path: Path) -> None:
    plan = compute_plan("cuda", "auto", tmp_path)
    assert plan.dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32"), plan


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_on_cuda_equals_cpu(name: str, examples: list[EncodedExample], tiny_model_dir: Path,
                                 tiny_tokenizer: Any, tmp_path: Path) -> None:
    model, hp = peft_model(name, tiny_model_dir)
    model.eval()
    make = BatchMaker.for_training(METHODS[name], hp, tiny_tokenizer.pad_token_id)
    if make.packed:
        use_packed_attention(model.get_base_model())
    batch = make(examples)
    with torch.no_grad():
        expected = float(batch_loss(model, batch))
    model.to("cuda")
    dtype = compute_plan("cuda", "auto", tmp_path).dtype
    with torch.no_grad(), accelerator_for(dtype, torch.device("cuda")).autocast():
        got = float(batch_loss(model, batch.to("cuda")))
    assert got == pytest.approx(expected, rel=2e-2 if dtype == "bfloat16" else 1e-4)
