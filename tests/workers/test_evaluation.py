"""Evaluation metrics are what they claim: loss and token accuracy equal the plain full-logits computation,
and batched, left-padded greedy answers equal answering each prompt alone, for every method and the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.data import EncodedExample
from adapters.methods import METHODS
from tests.workers.test_batches import peft_model, plain_batch
from workers.training.evaluation import attention, greedy_answers, model_metrics, prompt_and_answer
from workers.training.loop import BatchMaker


def plain_scores(model: Any, examples: list[EncodedExample], pad_id: int) -> tuple[float, float]:
    """Loss and token accuracy from the whole vocabulary's logits at every position."""
    batch = plain_batch(examples, pad_id)
    with torch.no_grad():
        logits = model(**batch).logits[:, -batch["labels"].shape[1]:]  # prompt methods add positions in front
    predicted, labels = logits[:, :-1], batch["labels"][:, 1:]
    where = labels != -100
    loss = torch.nn.functional.cross_entropy(predicted[where].float(), labels[where])
    accuracy = (predicted[where].argmax(-1) == labels[where]).float().mean()
    return float(loss), float(accuracy)


def one_by_one_answers(model: Any, tokenizer: Any, examples: list[EncodedExample]) -> list[str]:
    """The reference: each prompt alone, one full forward pass (the trained computation) per new token."""
    special = set(tokenizer.all_special_ids)
    answers = []
    for prompt, answer in (p for p in map(prompt_and_answer, examples) if p is not None):
        ids = list(prompt)
        for _ in range(len(answer)):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in special:
                break
        generated = ids[len(prompt):]
        cut = next((i for i, t in enumerate(generated) if t in special), len(generated))
        answers.append(str(tokenizer.decode(generated[:cut])).strip())
    return answers


@pytest.mark.parametrize("name", [None, *sorted(METHODS)])
def test_metrics_equal_the_plain_computation(name: str | None, examples: list[EncodedExample],
                                             tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    pad = tiny_tokenizer.pad_token_id
    if name is None:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        base, make = model, BatchMaker.for_base_model(max_len=1024, pad_id=pad)
    else:
        model, hp = peft_model(name, tiny_model_dir)
        model.eval()
        base, make = model.get_base_model(), BatchMaker.for_training(METHODS[name], hp, pad)
    expected_loss, expected_accuracy = plain_scores(model, examples, pad)
    metrics = model_metrics(model, base_model=base, tokenizer=tiny_tokenizer, examples=examples, make=make,
                            batch_size=3)
    assert metrics["loss"] == pytest.approx(expected_loss, abs=1e-4)
    assert metrics["mean_token_accuracy"] == pytest.approx(expected_accuracy, abs=1e-6)
    assert metrics["tokens"] == sum(sum(e.loss_mask[1:]) for e in examples)
    assert metrics["exact_match_examples"] == len(examples)
    pairs = [p for p in map(prompt_and_answer, examples) if p is not None]
    with attention(base, "sdpa"):
        batched = greedy_answers(model, tiny_tokenizer, [p for p, _ in pairs],
                                 max_new_tokens=[len(a) for _, a in pairs], batch_size=3)
        alone = one_by_one_answers(model, tiny_tokenizer, examples)
    assert batched == alone and any(batched)  # left padding and the KV cache change no answer
    assert base.config._attn_implementation == "sdpa"  # restored after scoring with packed attention


def test_prompt_and_answer_splits_before_the_last_trained_run() -> None:
    example = EncodedExample(input_ids=[1, 2, 3, 4, 5, 6, 7], loss_mask=[0, 1, 1, 0, 0, 1, 1])
    assert prompt_and_answer(example) == ([1, 2, 3, 4, 5], [6, 7])
    assert prompt_and_answer(EncodedExample(input_ids=[1, 2], loss_mask=[1, 1])) is None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_evaluator_hands_peft_only_the_admitted_config(name: str, examples: list[EncodedExample],
                                                           tiny_model_dir: Path, tiny_tokenizer: Any,
                                                           tmp_path: Path) -> None:
    """A stored adapter is scored through the config its method admits. One stored before imports were checked,
    with a regular expression where PEFT takes one, is refused naming the field, and the expression never runs
    (this one backtracks for hours on a module name)."""
    import json
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from workers.evaluator import _adapter_metrics
    from workers.training.checkpoints import save_adapter

    model, hp = peft_model(name, tiny_model_dir)
    save_adapter(model, tmp_path / "stored", METHODS[name])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    common = {"tokenizer": tiny_tokenizer, "examples": examples, "batch_size": 3, "autocast": None}
    metrics, base = _adapter_metrics(base, tmp_path / "stored", SimpleNamespace(method=name), max_len=1024,
                                     pad_id=tiny_tokenizer.pad_token_id, max_rank=64, common=common)
    expected_loss, _ = plain_scores(model.eval(), examples, tiny_tokenizer.pad_token_id)
    assert metrics["loss"] == pytest.approx(expected_loss, abs=1e-4)
    config_file = tmp_path / "stored" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if "target_modules" not in config:
        return  # prompt methods take no module patterns
    config_file.write_text(json.dumps({**config, "target_modules": "(.*q_?)*_proj$"}))
    with pytest.raises(ValueError, match="target_modules"):
        _adapter_metrics(base, tmp_path / "stored", SimpleNamespace(method=name), max_len=1024,
                         pad_id=tiny_tokenizer.pad_token_id, max_rank=64, common=common)


@pytest.mark.parametrize("name", [None, "lora", "prompt_tuning"])
def test_a_scoring_model_answers_as_it_would_alone(name: str | None, tiny_model_dir: Path, tiny_tokenizer: Any,
                                                   tmp_path: Path) -> None:
    """A score_model grader's conversations are answered by its scoring model (the base model, or an adapter
    applied for the call and removed again) exactly as that model answers each conversation alone; one too long
    for the server is not asked."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from workers.evaluator import _Scorer
    from workers.training.checkpoints import save_adapter

    conversations = [[{"role": "system", "content": "Score from 0 to 9."}, {"role": "user", "content": text}]
                     for text in ("A fine answer.", "No.", "An answer of some length, to pad the batch.")]
    reference: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapters, scorers = {}, [{"model": "base", "adapter_id": None}]
    if name is not None:
        reference, _ = peft_model(name, tiny_model_dir)
        save_adapter(reference, tmp_path / "stored", METHODS[name])
        reference.eval()
        adapters = {"ft-1": SimpleNamespace(id="ft-1", method=name)}
        scorers = [{"model": "judge", "adapter_id": "ft-1"}]
    store = SimpleNamespace(fetch_adapter=lambda adapter_id: tmp_path / "stored")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    scorer = _Scorer(base, tiny_tokenizer, adapters, store, scorers=scorers,  # type: ignore[arg-type]
                     max_rank=64, max_len=1024, autocast=None)
    given = scorer(scorers[0]["model"], conversations, 6)
    alone = []
    for conversation in conversations:
        text = tiny_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        prompt = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        example = EncodedExample(input_ids=prompt + [0] * 6, loss_mask=[0] * len(prompt) + [1] * 6)
        alone += one_by_one_answers(reference, tiny_tokenizer, [example])
    assert given == alone
    # The base model is whole again afterwards: a second call with the base answers as the base does.
    assert not any("lora" in n for n, _ in scorer.model.named_modules())
    short = _Scorer(scorer.model, tiny_tokenizer, adapters, store, scorers=scorers,  # type: ignore[arg-type]
                    max_rank=64, max_len=20, autocast=None)
    assert short(scorers[0]["model"], conversations, 6) == [None, None, None]
