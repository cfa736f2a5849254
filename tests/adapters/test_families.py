"""The conformance matrix: every base-model family (tests/families.py) × every registered method.

Per family, one tiny model: one adapter per method trained through the worker's training loop with the defaults the
family's structure gives (adapters/families.py), and one LoRA trained by plain PEFT on every linear layer. Per cell:
training reached the adapter's weights and nothing else; the adapter, served in one continuous batch with every other
method's adapter of the same base and base-model rows, gives PEFT's logits at every decode step (float32, 1e-4; the
reference decodes by full forward passes, no cache) and PEFT's greedy tokens. The prompts are longer than the sliding
windows of the families that have them. A family the engine does not serve is refused, naming what is missing.

End-to-end tier (`make test`): about a minute of CPU for the whole matrix.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.base_models import base_info
from adapters.data import encode_dataset, parse_jsonl
from adapters.engine import AdapterRef, SamplingParams
from adapters.families import FAMILIES as STRUCTURES
from adapters.families import served_families, unsupported_reason
from adapters.methods import METHODS
from tests.adapters.test_engine import make_runtime, peft_greedy, reference, scheduler_paused
from tests.conftest import MODEL_CACHE, chat_lines
from tests.families import FAMILIES, WINDOW, build_family_model
from tests.workers.test_batches import plain_batch
from workers.training.batches import batch_loss, use_packed_attention
from workers.training.checkpoints import save_adapter
from workers.training.loop import BatchMaker, TrainingConfig, TrainingRecipe

pytestmark = pytest.mark.e2e

PLAIN_PEFT = "plain-peft-lora"
SERVED = [name for name in FAMILIES if name in served_families()]
# Prompts longer than the sliding window, of different lengths (left padding in the batch).
PROMPTS = ["Say hi 12345, please, and then tell me a long story about it.",
           "One two three four five six seven eight nine ten",
           "A much longer prompt than the others, so that the batch has rows of quite different lengths, and more."]
DECODE_STEPS = 4


class _Settings:
    max_lora_rank = 64
    max_seq_length_limit = 4096


def train_method(name: str, folder: Path, tokenizer: Any, info: dict[str, Any], target: Path) -> dict[str, Any]:
    """One adapter of a method trained by the worker's loop, and what the step touched."""
    method = METHODS[name]
    examples = encode_dataset(tokenizer, parse_jsonl(chat_lines(4).encode(), max_examples=100))
    hp = method.resolve({"learning_rate": 0.05, "n_epochs": 1, "batch_size": 2}, n_examples=4,
                        settings=_Settings(), base_info=info)
    base = AutoModelForCausalLM.from_pretrained(folder)
    frozen = [(p, p.detach().clone()) for p in base.parameters()]
    model, _ = TrainingRecipe(TrainingConfig(method=method, hyperparameters=hp, seed=3, pad_id=tokenizer.pad_token_id),
                              base_model=base, train_examples=examples).run()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_ids = {id(p) for p, _ in frozen}
    save_adapter(model, target, method)
    return {"base_unchanged": all(torch.equal(p, before) for p, before in frozen),
            "base_trainable": any(id(p) in frozen_ids for p in trainable),
            "adapter_trained": bool(trainable)}


def train_plain_peft(folder: Path, target: Path) -> dict[str, Any]:
    """A LoRA made with PEFT alone (its own choice of targets: every linear layer but the head), a few steps."""
    torch.manual_seed(5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(target))
    return {}


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


@pytest.fixture(scope="module", params=SERVED)
def family(request: pytest.FixtureRequest, default_model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One family's whole matrix: adapters trained, one mixed continuous batch served, PEFT's references. What fails
    is recorded in its cell (`error`), so that one broken method fails its own cells, not the family's."""
    name = request.param
    folder = build_family_model(MODEL_CACHE, name, str(default_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    info = base_info(str(folder))
    cells: dict[str | None, dict[str, Any]] = {None: {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and steadier on a busy machine
    try:
        adapters: dict[str, Path] = {}
        for method in [*METHODS, PLAIN_PEFT]:
            target = tmp_path_factory.mktemp(f"{name}-{method}")
            try:
                cells[method] = {"training": train_method(method, folder, tokenizer, info, target)
                                 if method in METHODS else train_plain_peft(folder, target)}
                adapters[method] = target
            except Exception as exc:
                cells[method] = {"error": "training: " + failure(exc)}
        runtime = make_runtime(folder, tokenizer, slots=len(adapters))
        try:
            loaded = {}
            for key, path in adapters.items():
                try:
                    loaded[key] = runtime.adapters.load(AdapterRef(key=key, folder=path, base_model=name))
                except Exception as exc:
                    cells[key]["error"] = "loading: " + failure(exc)
            keys: list[str | None] = [None, *loaded]
            with scheduler_paused(runtime):  # every request is admitted into the same running batch
                submitted = []
                for index, key in enumerate(keys):
                    ids = tokenizer(PROMPTS[index % len(PROMPTS)], add_special_tokens=False)["input_ids"]
                    assert len(ids) > WINDOW
                    submitted.append((key, ids, runtime.submit(
                        ids, loaded[key] if key else None,
                        SamplingParams(max_tokens=DECODE_STEPS, temperature=0, ignore_eos=True), record_logits=True)))
            base_model = AutoModelForCausalLM.from_pretrained(folder).eval()
            for key, ids, seq in submitted:
                try:
                    result = seq.wait()
                except Exception as exc:
                    cells[key]["error"] = "serving: " + failure(exc)
                    continue
                model = base_model if key is None else reference(folder, adapters[key])
                expected_tokens, expected_logits = peft_greedy(model, ids, len(result.token_ids))
                with torch.no_grad():  # every prompt position: a sliding window can hide virtual tokens from the last
                    change = (model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]
                              - base_model(input_ids=torch.tensor([ids])).logits[0]).abs().max()
                assert seq.logits is not None
                cells[key].update(tokens=result.token_ids, expected_tokens=expected_tokens,
                                  logits=[seq.logits[0][-1]] + [step[-1] for step in seq.logits[1:]],
                                  expected_logits=expected_logits, change=float(change))
        finally:
            runtime.close()
        return {"name": name, "folder": folder, "tokenizer": tokenizer, "cells": cells, "info": info,
                "config": json.loads((folder / "config.json").read_text())}
    finally:
        torch.set_num_threads(threads)


def served_cell(family: dict[str, Any], key: str | None) -> dict[str, Any]:
    cell = family["cells"][key]
    assert "error" not in cell, cell["error"]
    return cell


@pytest.mark.parametrize("method", [*sorted(METHODS), PLAIN_PEFT])
def test_served_logits_equal_pefts_at_every_step(family: dict[str, Any], method: str) -> None:
    cell = served_cell(family, method)
    assert cell["change"] > 1e-3, "the adapter must actually change the model"
    assert len(cell["logits"]) == len(cell["expected_logits"]) == DECODE_STEPS
    for step, (ours, expected) in enumerate(zip(cell["logits"], cell["expected_logits"], strict=True)):
        assert torch.allclose(ours, expected, atol=1e-4), (step, (ours - expected).abs().max())
    assert cell["tokens"] == cell["expected_tokens"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_reaches_only_the_adapter(family: dict[str, Any], method: str) -> None:
    cell = family["cells"][method]
    assert "training" in cell, cell["error"]
    training = cell["training"]
    assert training["adapter_trained"] and not training["base_trainable"] and training["base_unchanged"], training


def test_base_rows_equal_the_plain_model(family: dict[str, Any]) -> None:
    cell = served_cell(family, None)
    for ours, expected in zip(cell["logits"], cell["expected_logits"], strict=True):
        assert torch.allclose(ours, expected, atol=1e-4)


def test_packed_training_loss_equals_the_padded_plain_loss(family: dict[str, Any]) -> None:
    """The packed training path keeps the family's attention (sliding windows shorter than the examples,
    soft-capping): its loss is the plain right-padded forward pass's."""
    tokenizer = family["tokenizer"]
    lines = "\n".join(json.dumps({"messages": [{"role": "user", "content": "word " * (5 * i)},
                                               {"role": "assistant", "content": "answer " * i}]}) for i in range(1, 5))
    examples = encode_dataset(tokenizer, parse_jsonl((lines + "\n").encode(), max_examples=100))
    assert max(len(e.input_ids) for e in examples) > 2 * WINDOW
    model = AutoModelForCausalLM.from_pretrained(family["folder"]).eval()
    with torch.no_grad():
        plain = model(**plain_batch(examples, tokenizer.pad_token_id)).loss
        make = BatchMaker.for_base_model(max_len=1024, pad_id=tokenizer.pad_token_id)
        use_packed_attention(model)
        packed = batch_loss(model, make(examples))
    assert abs(float(packed) - float(plain)) < 1e-4, (float(packed), float(plain))


def test_defaults_come_from_the_familys_structure(family: dict[str, Any]) -> None:
    structure = STRUCTURES[family["name"]]
    info = family["info"]
    assert info["family"] == family["name"] and unsupported_reason(family["config"]) is None
    assert info["default_target_modules"] == list(structure.projections)
    assert info["scaled_modules"] == list(structure.scaled)


def test_a_family_the_engine_cannot_serve_is_refused_naming_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "its Conv1D projections are not hooked"
    monkeypatch.setitem(STRUCTURES, "gpt2", replace(STRUCTURES["gpt2"], missing=missing))
    reason = unsupported_reason({"model_type": "gpt2"})
    assert reason is not None and "GPT-2" in reason and "Conv1D" in reason
    assert "gpt2" not in served_families()


def test_an_unknown_family_is_refused() -> None:
    reason = unsupported_reason({"model_type": "mamba"})
    assert reason is not None and "mamba" in reason and "llama" in reason
