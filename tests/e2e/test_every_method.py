"""Every registered method through the unchanged OpenAI SDK: fine-tune with `method.type` set to it, see
the model in /v1/models, and chat with it alone and in one batch mixed with every other method."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from adapters.methods import METHODS
from tests.budgets import JOB_DONE, budget
from tests.conftest import TEST_KEY, Stack, chat_lines
from tests.tiny_model import TINY_MODEL_ID

PROMPTS = ["Say hi 3", "Say hi 40, please", "Hello there, who are you and what do you do all day?"]


@pytest.fixture(scope="module")
def sdk(stack: Stack) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=TEST_KEY, max_retries=0,
                         timeout=budget(120))


@pytest.fixture(scope="module")
def fine_tuned(sdk: Any) -> dict[str, str]:
    """One model per registered method, every job submitted through the SDK before any is awaited."""
    file = sdk.files.create(file=("train.jsonl", chat_lines(16, answer="HELLO WORLD").encode()), purpose="fine-tune")
    jobs = {}
    for name, method in METHODS.items():
        hyperparameters = {"n_epochs": 2, "batch_size": 4,
                           "learning_rate": min(0.1, 20 * method.default_learning_rate)}
        jobs[name] = sdk.fine_tuning.jobs.create(
            model=TINY_MODEL_ID, training_file=file.id, suffix=name.replace("_", "-"),
            method={"type": name, name: {"hyperparameters": hyperparameters}})
    models = {}
    deadline = time.monotonic() + budget(JOB_DONE) * len(jobs)
    for name, job in jobs.items():
        job = finished(sdk, job, deadline)
        assert job.status == "succeeded", (name, job.error)
        assert job.method.type == name
        models[name] = job.fine_tuned_model
    return models


def finished(sdk: Any, job: Any, deadline: float) -> Any:
    """The job, polled through the SDK until it ends (before `deadline`, a time.monotonic() value)."""
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"{job.id} still {job.status}"
        time.sleep(0.3)
        job = sdk.fine_tuning.jobs.retrieve(job.id)
    return job


def ask(sdk: Any, model: str, prompt: str) -> str:
    reply = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8,
                                        temperature=0)
    return str(reply.choices[0].message.content)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_and_answers_through_the_sdk(sdk: Any, fine_tuned: dict[str, str], name: str) -> None:
    model = fine_tuned[name]
    assert model.startswith(f"ft:{TINY_MODEL_ID}:{name.replace('_', '-')}:")
    listed = {m.id: m for m in sdk.models.list().data}
    assert getattr(listed[model], "parent", None) == TINY_MODEL_ID
    assert ask(sdk, model, PROMPTS[0]) != ask(sdk, TINY_MODEL_ID, PROMPTS[0]), "the adapter changes nothing"
    streamed = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                           max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == \
        ask(sdk, model, PROMPTS[1])


def test_every_method_in_one_mixed_batch(sdk: Any, fine_tuned: dict[str, str]) -> None:
    """Requests for the base model and every method's model at once (the engine batches them together)
    answer exactly as each does alone."""
    requests = [(model, prompt) for model in [TINY_MODEL_ID, *fine_tuned.values()] for prompt in PROMPTS]
    alone = [ask(sdk, model, prompt) for model, prompt in requests]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(lambda r: ask(sdk, *r), requests))
    assert together == alone
    # Different methods, trained on the same data, still answer as themselves (not as one shared adapter).
    assert len({tuple(alone[i:i + len(PROMPTS)]) for i in range(0, len(alone), len(PROMPTS))}) > 2


def test_an_adalora_model_cut_to_its_rank_budget_continues_through_the_sdk(sdk: Any,
                                                                          fine_tuned: dict[str, str]) -> None:
    """A job continues the AdaLoRA model trained above, whose saved adapter PEFT cut to its rank budget (a fresh
    model holds the full rank: loaded as saved, the job failed at its start with a size mismatch). It starts from
    those weights, trains, and its model serves at once."""
    file = sdk.files.create(file=("more.jsonl", chat_lines(8, answer="HELLO WORLD").encode()), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=file.id, suffix="adalora-more",
        method={"type": "adalora", "adalora": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
        extra_body={"from_model": fine_tuned["adalora"]})
    job = finished(sdk, job, time.monotonic() + budget(JOB_DONE))
    assert job.status == "succeeded", job.error
    events = [event.message for event in sdk.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(message.startswith("Starting from the weights of") for message in events), events
    assert ask(sdk, job.fine_tuned_model, "Hello?")


def preference_pairs(prompts: range, answers: tuple[str, str] = ("Yes, gladly.", "No, sorry.")) -> bytes:
    """OpenAI's DPO lines: the preferred answer is always an agreement, the other a refusal, which the tiny base model
    finds the more likely (by about 14 nats on these prompts with the default answers)."""
    return "\n".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"Could you help me with task {i}?"}]},
        "preferred_output": [{"role": "assistant", "content": answers[0]}],
        "non_preferred_output": [{"role": "assistant", "content": answers[1]}]}) for i in prompts).encode()


def test_dpo_continues_a_supervised_model_through_the_sdk(sdk: Any, fine_tuned: dict[str, str]) -> None:
    """OpenAI's SFT-then-DPO recipe with OpenAI's documented call: a DPO job on the LoRA model trained above moves it
    towards the preferred answers of held-out pairs: each becomes the more likely answer, where the base model found
    the other one more likely every time. The model serves at once."""
    train = sdk.files.create(file=("pairs.jsonl", preference_pairs(range(8))), purpose="fine-tune")
    heldout = sdk.files.create(file=("heldout.jsonl", preference_pairs(range(100, 108))), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=train.id, validation_file=heldout.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 8, "batch_size": 4}}},
        extra_body={"from_model": fine_tuned["lora"]})
    job = finished(sdk, job, time.monotonic() + budget(JOB_DONE))
    assert job.status == "succeeded", job.error
    stored = job.to_dict()
    hyperparameters = stored["method"]["lora"]["hyperparameters"]
    assert (hyperparameters["objective"], hyperparameters["beta"]) == ("dpo", 0.1)
    result = stored["result"]
    assert result["full_valid_preference_accuracy"] == 1.0 and result["full_valid_reward_margin"] > 0, result
    assert result["full_valid_prefers_preferred"] == 1.0, result
    assert result["base_model"]["full_valid_prefers_preferred"] == 0.0, result
    assert job.fine_tuned_model in {m.id for m in sdk.models.list().data}
    assert ask(sdk, job.fine_tuned_model, "Could you help me with task 200?")


def test_reference_free_objectives_through_the_sdk(sdk: Any) -> None:
    """ORPO and SimPO (no reference pass), from the base model, with the method's own type and the objective as a
    hyperparameter: each makes the preferred answer the likelier one on every held-out pair, where the base model
    found the other one likelier every time. Both answers have the same number of tokens here: these objectives
    compare log-probabilities per token, the end report's preferred share compares whole answers."""
    answers = ("Yes.", "No.")  # the base model prefers "No." on every prompt below, by 0.2 to 0.9 nats
    train = sdk.files.create(file=("pairs.jsonl", preference_pairs(range(8), answers)), purpose="fine-tune")
    heldout = sdk.files.create(file=("heldout.jsonl", preference_pairs(range(100, 108), answers)),
                               purpose="fine-tune")
    jobs = {objective: sdk.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=train.id, validation_file=heldout.id, suffix=objective,
        method={"type": "lora", "lora": {"hyperparameters": {"objective": objective, "n_epochs": 8, "batch_size": 4}}})
        for objective in ("orpo", "simpo")}
    deadline = time.monotonic() + budget(JOB_DONE) * len(jobs)
    for objective, job in jobs.items():
        job = finished(sdk, job, deadline)
        assert job.status == "succeeded", (objective, job.error)
        result = job.to_dict()["result"]
        assert result["full_valid_preference_accuracy"] == 1.0, (objective, result)
        assert result["full_valid_prefers_preferred"] == 1.0, (objective, result)
        assert result["base_model"]["full_valid_prefers_preferred"] == 0.0, (objective, result)


def test_kto_on_thumbs_up_and_down_through_the_sdk(sdk: Any) -> None:
    """KTO on single answers marked good or bad (what a team collects as thumbs up / down), through the SDK with the
    method's type and objective "kto": on held-out prompts the good answer becomes likelier than under the base
    model and the bad one less likely."""
    def lines(prompts: range) -> bytes:
        return "\n".join(json.dumps({
            "input": {"messages": [{"role": "user", "content": f"Could you help me with task {i}?"}]},
            "output": [{"role": "assistant", "content": "Yes, gladly." if i % 2 == 0 else "No, sorry."}],
            "label": i % 2 == 0}) for i in prompts).encode()

    train = sdk.files.create(file=("thumbs.jsonl", lines(range(8))), purpose="fine-tune")
    heldout = sdk.files.create(file=("thumbs-heldout.jsonl", lines(range(100, 108))), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=train.id, validation_file=heldout.id, suffix="kto",
        method={"type": "lora", "lora": {"hyperparameters": {"objective": "kto", "n_epochs": 8, "batch_size": 4}}})
    job = finished(sdk, job, time.monotonic() + budget(JOB_DONE))
    assert job.status == "succeeded", job.error
    result = job.to_dict()["result"]
    assert result["full_valid_preference_accuracy"] == 1.0, result
    assert result["full_valid_desirable_logratio"] > 0 > result["full_valid_undesirable_logratio"], result
