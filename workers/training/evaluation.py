"""How good a model is on a set of examples: loss and mean token accuracy over the labelled tokens (OpenAI's
checkpoint metrics), and exact match of greedy answers. Used for a job's checkpoints and its end report,
for the base model beside it, and by on-demand evaluations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from adapters.data import EncodedExample
from workers.training.batches import TrainingBatch, labelled_logits


@dataclass
class Scores:
    loss: float  # mean cross-entropy per labelled token
    mean_token_accuracy: float  # share of labelled tokens whose most likely prediction is the label
    tokens: int  # labelled tokens scored


@torch.no_grad()
def score(model: Any, examples: list[EncodedExample], *, make: Callable[[list[EncodedExample]], TrainingBatch],
          batch_size: int, autocast: Any = None) -> Scores:
    """Loss and token accuracy over the labelled tokens of `examples` (batches as `make` builds them)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    tokens = 0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(examples), batch_size):
            batch = make(examples[start:start + batch_size]).to(device)
            with autocast() if autocast is not None else nullcontext():
                logits = labelled_logits(model, batch)
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="sum").cpu()
            correct += (logits.argmax(-1) == batch.targets).sum().cpu()
            tokens += len(batch.targets)
    finally:
        model.train(was_training)
    return Scores(loss=float(loss_sum) / max(1, tokens), mean_token_accuracy=int(correct) / max(1, tokens),
                  tokens=tokens)


@contextmanager
def attention(model: Any, implementation: str) -> Iterator[None]:
    """Run with another attention implementation (generation needs a cached one, not packed training's)."""
    from workers.training.batches import available, use_attention

    before = model.config._attn_implementation
    if before == available(model, implementation):
        yield
        return
    use_attention(model, implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def prompt_and_answer(example: EncodedExample) -> tuple[list[int], list[int]] | None:
    """The example split before its last run of trained tokens (the reference answer), or None when
    nothing comes before it (plain text examples have no prompt to answer)."""
    mask = example.loss_mask
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    if start == 0 or start == end:
        return None
    return example.input_ids[:start], example.input_ids[start:end]


def answer_text(tokenizer: Any, ids: list[int]) -> str:
    """The text up to the first special token (end of turn / end of text), stripped."""
    special = set(tokenizer.all_special_ids)
    kept: list[int] = []
    for token in ids:
        if token in special:
            break
        kept.append(token)
    return str(tokenizer.decode(kept)).strip()


def _prompt_learning(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _greedy_by_forward(model: Any, input_ids: torch.Tensor, steps: int, stop_ids: set[int]) -> torch.Tensor:
    """Greedy decoding by a full forward pass per new token (rows of equal length, no padding). PEFT's
    generate() is not the trained forward pass for methods with virtual tokens or prefixes (prefix tuning's
    answers come out as the base model's; prompt tuning's drift from the third token on), while its forward
    pass is what training and the serving engine compute. Answers are short, so the quadratic cost is too."""
    ids = input_ids
    stops = torch.tensor(sorted(stop_ids), device=ids.device)
    finished = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    for _ in range(steps):
        following = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, following[:, None]], dim=1)
        finished |= torch.isin(following, stops)
        if bool(finished.all()):
            break
    return ids


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: list[int],
                   batch_size: int = 8, autocast: Any = None) -> list[str]:
    """Greedy answers to the prompts (left-padded batches of similar lengths), as text up to the first
    special token, in the prompts' order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if _prompt_learning(model):
        # PEFT drops position ids for methods that put virtual tokens in front of the input, so left padding
        # would move a row's prompt away from its virtual tokens: batch only prompts of the same length.
        by_length: dict[int, list[int]] = {}
        for i in order:
            by_length.setdefault(len(prompts[i]), []).append(i)
        chunks = [same[start:start + batch_size] for same in by_length.values()
                  for start in range(0, len(same), batch_size)]
    try:
        for chunk in chunks:
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            steps = max(max_new_tokens[i] for i in chunk)
            with autocast() if autocast is not None else nullcontext():
                if _prompt_learning(model):
                    out = _greedy_by_forward(model, input_ids.to(device), steps, set(tokenizer.all_special_ids))
                else:
                    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                         max_new_tokens=steps, do_sample=False, pad_token_id=pad)
            for row, i in enumerate(chunk):
                answers[i] = answer_text(tokenizer, out[row, width:width + max_new_tokens[i]].tolist())
    finally:
        model.train(was_training)
    return answers


def _conversation_ids(tokenizer: Any, conversation: list[dict[str, str]]) -> list[int] | None:
    """The conversation's prompt tokens, or None where the model's chat template refuses it (some templates have no
    system role, some insist on alternating turns): a rubric is a tenant's, and one it cannot take is not asked."""
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja's TemplateError and the templates' own raise_exception messages
        return None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_conversations(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *,
                         max_new_tokens: int, max_len: int, batch_size: int = 8,
                         autocast: Any = None) -> list[str | None]:
    """Greedy answers to chat conversations (a score_model grader's rubric), None for one the chat template refuses
    or whose prompt and answer would not fit in max_len tokens (it is not asked)."""
    prompts = [_conversation_ids(tokenizer, c) for c in conversations]
    asked = [i for i, prompt in enumerate(prompts) if prompt is not None and len(prompt) + max_new_tokens <= max_len]
    answers: list[str | None] = [None] * len(prompts)
    if asked:
        given = greedy_answers(model, tokenizer, [prompts[i] for i in asked],
                               max_new_tokens=[max_new_tokens] * len(asked), batch_size=batch_size, autocast=autocast)
        for i, text in zip(asked, given, strict=True):
            answers[i] = text
    return answers


def answerable(examples: list[EncodedExample], max_examples: int | None = None) -> list[int]:
    """The indexes of the examples asked for a greedy answer: the first `max_examples` that have a prompt."""
    asked = [i for i, example in enumerate(examples) if prompt_and_answer(example) is not None]
    return asked if max_examples is None else asked[:max_examples]


def exact_match(model: Any, tokenizer: Any, examples: list[EncodedExample], *, batch_size: int = 8,
                max_examples: int | None = None, autocast: Any = None,
                answers: list[str] | None = None) -> tuple[float | None, int]:
    """Share of examples whose greedy answer equals the reference answer (text up to the end-of-turn token,
    stripped), and how many were asked. (None, 0) when no example has a prompt to answer. The answers, in the
    order of answerable(examples, max_examples), are appended to `answers` when it is given (graders read them)."""
    pairs = [pair for pair in (prompt_and_answer(examples[i]) for i in answerable(examples, max_examples))
             if pair is not None]
    if not pairs:
        return None, 0
    given = greedy_answers(model, tokenizer, [prompt for prompt, _ in pairs],
                           max_new_tokens=[len(answer) for _, answer in pairs], batch_size=batch_size,
                           autocast=autocast)
    if answers is not None:
        answers.extend(given)
    right = sum(text == answer_text(tokenizer, answer) for text, (_, answer) in zip(given, pairs, strict=True))
    return right / len(pairs), len(pairs)


def model_metrics(model: Any, *, base_model: Any, tokenizer: Any, examples: list[EncodedExample], make: Any,
                  batch_size: int, autocast: Any = None, exact_match_examples: int | None = None,
                  answers: list[str] | None = None) -> dict[str, Any]:
    """Every metric of `model` (a PeftModel, or the base model itself) on `examples`: loss and mean token
    accuracy over the labelled tokens, and exact match of greedy answers (appended to `answers` when it is given).
    `make` is a loop.BatchMaker (its `attention` is set on `base_model` while scoring; generation runs with
    SDPA)."""
    with attention(base_model, make.attention):
        scores = score(model, examples, make=make, batch_size=batch_size, autocast=autocast)
    with attention(base_model, "sdpa"):
        matched, asked = exact_match(model, tokenizer, examples, batch_size=batch_size,
                                     max_examples=exact_match_examples, autocast=autocast, answers=answers)
    return {"loss": round(scores.loss, 6), "mean_token_accuracy": round(scores.mean_token_accuracy, 6),
            "tokens": scores.tokens, "exact_match": None if matched is None else round(matched, 6),
            "exact_match_examples": asked}
