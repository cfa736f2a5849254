"""One attempt at one claimed evaluation (`run`): load the base model once, score it or each adapter on it
with the training path's own metrics (workers.training.evaluation), grade their answers with the evaluation's
graders (workers.grading), and record the results in order.

Imports torch: only a pool process, never the Celery parent, imports this module (workers.tasks imports it
inside the task).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from adapters.base_models import resolve_device
from adapters.compute import compute_plan
from adapters.data import encode_dataset, parse_jsonl
from adapters.methods import METHODS
from adapters.store import ADAPTER_CONFIG, ArtifactStore
from app.db.models import Adapter, AdapterStatus, Evaluation, File
from app.db.session import session_scope
from app.queue import enqueue_evaluation
from app.services import base_models, evaluations
from app.settings import get_settings
from workers import process
from workers.grading import grade_answers, graded_items
from workers.lease import Lease
from workers.training.evaluation import (
    answer_conversations,
    attention,
    model_metrics,
)
from workers.training.loop import BatchMaker, accelerator_for, has_trained_tokens

log = logging.getLogger("adaptery.worker")

# Examples per forward pass while scoring and per generate() call for exact match.
BATCH_SIZE = 8


class EvaluationFailed(Exception):
    """The evaluation cannot run; `code` and the message are what its client sees."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def run(evaluation_id: str, *, owner: str, lease: Lease) -> str:
    """Evaluate every model of a claimed evaluation; returns done, handed_back or lease_lost. An exception
    means the attempt failed (the Celery task records it)."""
    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    store = ArtifactStore.for_settings(settings)
    evaluation, adapters = _load_rows(evaluation_id)
    try:
        spec = base_models.resolve(settings, evaluation.base_model)
    except base_models.UnknownBaseModel:
        raise EvaluationFailed("model_not_found", f"The base model '{evaluation.base_model}' is no longer offered "
                                                  "by this server.") from None
    plan = compute_plan(resolve_device(settings.device), settings.training_dtype, settings.data_dir)
    tokenizer = base_models.load_tokenizer(settings, spec)
    model = base_models.load_model(settings, spec, dtype=plan.dtype)
    autocast = accelerator_for(plan.dtype, next(model.parameters()).device).autocast
    # Every labelled token of every example is scored (examples are at most ADAPTERY_MAX_EXAMPLE_TOKENS long),
    # the same for every model, so their numbers compare.
    max_len = settings.max_seq_length_limit
    dataset = parse_jsonl(store.read_file(evaluation.file), max_examples=settings.max_examples_per_file)
    kept = [(record, example) for record, example in zip(dataset.records, encode_dataset(tokenizer, dataset),
                                                          strict=True) if has_trained_tokens(example, max_len)]
    if not kept:
        raise EvaluationFailed("invalid_file", f"No example of file '{evaluation.file}' has a labelled token to "
                                               "score.")
    examples = [example for _, example in kept]
    pad_id = tokenizer.pad_token_id
    common: dict[str, Any] = {"tokenizer": tokenizer, "examples": examples, "batch_size": BATCH_SIZE,
                              "autocast": autocast, "exact_match_examples": settings.exact_match_examples}
    results = []
    answers: list[list[str]] = []  # each model's greedy answers, for the graders
    for index, target in enumerate(evaluation.targets):
        if lease.lost.is_set():  # another worker owns it now: write nothing
            log.warning("evaluation %s: lease lost; stopping without writing", evaluation_id)
            return "lease_lost"
        if process.shutting_down.is_set():
            return _hand_back(evaluation_id, owner)
        name = target["model"]
        answers.append([])
        try:
            if target["adapter_id"] is None:
                metrics = model_metrics(model, base_model=model, make=BatchMaker.for_base_model(
                                            max_len=max_len, pad_id=pad_id), answers=answers[-1], **common)
            else:
                adapter = adapters[target["adapter_id"]]
                metrics, model = _adapter_metrics(model, store.fetch_adapter(adapter.id), adapter, max_len=max_len,
                                                  pad_id=pad_id, max_rank=settings.max_lora_rank,
                                                  common={**common, "answers": answers[-1]})
        except Exception as exc:
            raise EvaluationFailed("evaluation_error", f"models[{index}] '{name}': {type(exc).__name__}: "
                                                       f"{exc}") from exc
        results.append({"model": name, **metrics})
    if evaluation.grading:
        items = graded_items([record for record, _ in kept], examples, tokenizer, settings.exact_match_examples)
        scorer = _Scorer(model, tokenizer, adapters, store, scorers=evaluation.grading["scorers"],
                         max_rank=settings.max_lora_rank, max_len=max_len, autocast=autocast)
        try:
            grades = grade_answers(evaluation.grading["graders"], items, answers, scorer)
        except Exception as exc:
            raise EvaluationFailed("evaluation_error", f"grading: {type(exc).__name__}: {exc}") from exc
        for result, model_grades in zip(results, grades, strict=True):
            result["grades"] = model_grades
    with session_scope() as session:
        if not evaluations.mark_succeeded(session, evaluation_id, results=results, owner=owner):
            return "lease_lost"
    log.info("evaluation %s: %d model(s) on %d examples in %.1f s", evaluation_id, len(results), len(examples),
             time.perf_counter() - started)
    return "done"


def _load_rows(evaluation_id: str) -> tuple[Evaluation, dict[str, Adapter]]:
    """The evaluation and its adapters, checked again: the file and every adapter must still be there."""
    with session_scope() as session:
        evaluation = session.get(Evaluation, evaluation_id)
        assert evaluation is not None
        file = session.get(File, evaluation.file)
        scorers = (evaluation.grading or {}).get("scorers", [])
        ids = [t["adapter_id"] for t in evaluation.targets + scorers if t["adapter_id"] is not None]
        adapters = {a.id: a for a in session.scalars(select(Adapter).where(Adapter.id.in_(ids),
                                                                           Adapter.status == AdapterStatus.ready))}
        session.expunge_all()
    if file is None or file.deleted:
        raise EvaluationFailed("invalid_file", f"File '{evaluation.file}' no longer exists.")
    for index, target in enumerate(evaluation.targets):
        if target["adapter_id"] is not None and target["adapter_id"] not in adapters:
            raise EvaluationFailed("model_not_found", f"models[{index}] '{target['model']}' no longer exists.")
    for scorer in scorers:
        if scorer["adapter_id"] is not None and scorer["adapter_id"] not in adapters:
            raise EvaluationFailed("model_not_found", f"The scoring model '{scorer['model']}' no longer exists.")
    return evaluation, adapters


class _Applied:
    """A base model with one stored adapter applied by PEFT; `restored` is the base model without it again, once the
    `applied` block has ended."""

    def __init__(self, peft_model: Any, method: Any, config: dict[str, Any]):
        self.model = peft_model
        self.base = peft_model.get_base_model()
        self.method = method
        self.config = config
        self.restored: Any = None


@contextmanager
def applied(base: Any, folder: Path, adapter: Adapter, *, max_rank: int) -> Iterator[_Applied]:
    """`base` with the adapter applied the way it was trained and saved (for P-tuning that is the prompt
    encoder's saved output embeddings); removing it restores the base model exactly, so one loaded base model
    serves every adapter of the evaluation in turn."""
    from peft import PeftConfig, PeftModel

    method = METHODS[adapter.method]
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    # PEFT reads the config the method admits, never the stored file as it is: an adapter imported before imports
    # were checked may hold a tenant's regular expression, which PEFT would run over the module names.
    admitted = method.sanitise_config(config, max_rank=max_rank,
                                      module_names=frozenset(n for n, _ in base.named_modules() if n))
    peft_model = PeftModel.from_pretrained(base, str(folder), config=PeftConfig.from_peft_type(**admitted))
    result = _Applied(peft_model, method, config)
    try:
        yield result
    finally:
        # Prompt-learning adapters sit beside the base model and leave it untouched; the others are injected
        # into its layers, and unload() puts the original layers back.
        result.restored = peft_model.get_base_model() if peft_model.active_peft_config.is_prompt_learning \
            else peft_model.unload()


def _adapter_metrics(base: Any, folder: Path, adapter: Adapter, *, max_len: int, pad_id: int, max_rank: int,
                     common: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The metrics of `base` with the adapter applied, and the base model without it again."""
    with applied(base, folder, adapter, max_rank=max_rank) as with_adapter:
        # What the method reads to lay out its batches (virtual tokens in front of the input) is in its config.
        make = BatchMaker.for_saved_adapter(with_adapter.method, with_adapter.config, max_len=max_len,
                                            pad_id=pad_id)
        metrics = model_metrics(with_adapter.model, base_model=with_adapter.base, make=make, **common)
    return metrics, with_adapter.restored


class _Scorer:
    """Answers score_model graders' conversations with their scoring model: the base model as loaded, or one of
    the evaluation's scoring adapters applied to it for the call."""

    def __init__(self, model: Any, tokenizer: Any, adapters: dict[str, Adapter], store: ArtifactStore, *,
                 scorers: list[dict[str, Any]], max_rank: int, max_len: int, autocast: Any):
        self.model, self.tokenizer, self.adapters, self.store = model, tokenizer, adapters, store
        self.adapter_of = {s["model"]: s["adapter_id"] for s in scorers}
        self.max_rank, self.max_len, self.autocast = max_rank, max_len, autocast

    def __call__(self, name: str, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[str | None]:
        adapter_id = self.adapter_of[name]
        common = {"max_new_tokens": max_tokens, "max_len": self.max_len, "batch_size": BATCH_SIZE,
                  "autocast": self.autocast}
        if adapter_id is None:
            with attention(self.model, "sdpa"):
                return answer_conversations(self.model, self.tokenizer, conversations, **common)
        adapter = self.adapters[adapter_id]
        with applied(self.model, self.store.fetch_adapter(adapter.id), adapter,
                     max_rank=self.max_rank) as with_adapter, attention(with_adapter.base, "sdpa"):
            answers = answer_conversations(with_adapter.model, self.tokenizer, conversations, **common)
        self.model = with_adapter.restored
        return answers


def _hand_back(evaluation_id: str, owner: str) -> str:
    """The worker is shutting down: back to the queue (it runs again from the start on another worker)."""
    with session_scope() as session:
        evaluations.release(session, evaluation_id, owner=owner)
    enqueue_evaluation(evaluation_id)  # if the broker is down, the reaper re-sends it
    return "handed_back"
