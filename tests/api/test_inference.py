"""The OpenAI inference routes in this process, on the tiny model the app serves itself: refusals name the field,
a seeded sample is the same twice, and no tenant can starve another (pin quotas, a bounded wait for an adapter
slot, a concurrency limit per tenant, a generation timeout, no API thread held while the engine works)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient

from tests.adapters.test_engine import scheduler_paused
from tests.api.adapters_made_with_peft import files_of, save_lora, send_files
from tests.api.conftest import Api, error_of, in_process_api
from tests.budgets import UNLESS_BROKEN, budget
from tests.conftest import ADMIN_KEY
from tests.tiny_model import TINY_MODEL_ID


def test_inference_errors(client: TestClient) -> None:
    unknown = client.post("/v1/chat/completions", json={"model": "ft:nope:x", "messages": [
        {"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"
    bad_role = client.post("/v1/chat/completions", json={"model": TINY_MODEL_ID, "messages": [
        {"role": "robot", "content": "hi"}]})
    assert bad_role.status_code == 400 and error_of(bad_role)["param"] == "messages[0].role"
    too_long = client.post("/v1/completions", json={"model": TINY_MODEL_ID, "prompt": "hi", "max_tokens": 10**6})
    assert too_long.status_code == 400 and error_of(too_long)["param"] == "max_tokens"
    sampled = {"model": TINY_MODEL_ID, "prompt": "Once upon", "max_tokens": 5, "temperature": 0.8, "top_p": 0.9,
               "seed": 3}
    completion = client.post("/v1/completions", json=sampled)
    assert completion.status_code == 200, completion.text
    body = completion.json()
    assert body["object"] == "text_completion" and 0 < body["usage"]["completion_tokens"] <= 5
    again = client.post("/v1/completions", json=sampled).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]  # same seed, same sample


# ------------------------------------------------------------------ fairness: pins, slots, concurrency, timeouts


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Api]:
    """This module's app: three adapter slots per base model (so at most two pinned), at most one pin per tenant,
    and a short bounded wait for a slot."""
    with in_process_api(tmp_path_factory.mktemp("inference"), tiny_model_dir, extra={
            "ADAPTERY_ADAPTER_CACHE_SIZE": "3", "ADAPTERY_MAX_PINNED_ADAPTERS_PER_TENANT": "1",
            "ADAPTERY_ADAPTER_SLOT_WAIT_SECONDS": "0.5"}) as running:
        yield running


def _tenant(api: Api, name: str) -> TestClient:
    created = api.as_key(ADMIN_KEY).post("/v1/admin/tenants", json={"name": name})
    assert created.status_code == 200, created.text
    return api.as_key(created.json()["api_key"])


def _import(client: TestClient, tiny_model_dir: Path, folder: Path, seed: int) -> str:
    response = send_files(client, files_of(save_lora(tiny_model_dir, folder / f"lora-{seed}", seed=seed)))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def _runtime() -> Any:
    from app.services.inference import get_engine
    from app.settings import get_settings

    return get_engine(get_settings()).runtime(TINY_MODEL_ID)


def _until(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_pins_are_a_per_tenant_quota_the_admin_can_undo_and_a_slot_wait_is_bounded(
        api: Api, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Item 4 of issue 21: one tenant cannot take the slots with pins (a pin beyond its quota is a 429 naming the
    setting), the admin can unpin anyone's adapter, and a request whose adapter finds no slot answers a 503 with
    Retry-After after the bounded wait instead of waiting for as long as the slots stay busy."""
    a, b = _tenant(api, "pins-a"), _tenant(api, "pins-b")
    a1, a2, a3 = (_import(a, tiny_model_dir, tmp_path, seed) for seed in range(3))
    b1 = _import(b, tiny_model_dir, tmp_path, 3)
    assert a.post(f"/v1/adapters/{a1}/pin").json()["pinned"] is True
    refused = a.post(f"/v1/adapters/{a2}/pin")
    assert refused.status_code == 429, refused.text
    error = error_of(refused)
    assert error["code"] == "too_many_pinned_adapters" and "ADAPTERY_MAX_PINNED_ADAPTERS_PER_TENANT" in \
        error["message"] and int(refused.headers["retry-after"]) >= 1
    assert b.post(f"/v1/adapters/{b1}/pin").status_code == 200  # another tenant's quota is its own
    admin = api.as_key(ADMIN_KEY)
    unpinned = admin.post(f"/v1/admin/adapters/{a1}/unpin")
    assert unpinned.status_code == 200, unpinned.text
    assert unpinned.json()["pinned"] is False and a.get(f"/v1/adapters/{a1}").json()["pinned"] is False
    assert a.post(f"/v1/adapters/{a2}/unpin").status_code == 200
    assert admin.post("/v1/admin/adapters/adapter-nope/unpin").status_code == 404
    assert a.post(f"/v1/adapters/{a2}/pin").status_code == 200  # within its quota again

    # Slots: a2 and b1 pinned, the third busy with a running request of a1: a3 cannot get one.
    from adapters.engine import SamplingParams
    from app.db.models import Adapter
    from app.db.session import get_sessionmaker
    from app.services.inference import load_into_memory
    from app.settings import get_settings

    with get_sessionmaker()() as session:
        row = session.get(Adapter, a1)
        assert row is not None
        runtime, loaded = load_into_memory(get_settings(), row)
    ids = runtime.tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    room = runtime.model.config.max_position_embeddings - len(ids)
    holder = runtime.submit(ids, loaded, SamplingParams(max_tokens=room, temperature=0, ignore_eos=True))
    try:
        assert holder.events.get(timeout=UNLESS_BROKEN)[0] == "delta"
        for stream in (False, True):
            waited = a.post("/v1/completions", json={"model": a3, "prompt": "Hi", "max_tokens": 2, "stream": stream})
            assert waited.status_code == 503, waited.text
            assert error_of(waited)["code"] == "no_free_slot" and "ADAPTERY_ADAPTER_SLOT_WAIT_SECONDS" in \
                error_of(waited)["message"] and int(waited.headers["retry-after"]) >= 1
        assert holder.finish_reason is None
    finally:
        holder.cancel()
        holder.wait()
    assert a.post("/v1/completions", json={"model": a3, "prompt": "Hi", "max_tokens": 2}).status_code == 200
    for key, adapter in ((a, a2), (b, b1)):
        assert key.post(f"/v1/adapters/{adapter}/unpin").status_code == 200


def test_waiting_generations_hold_no_api_thread_and_each_tenant_has_a_concurrency_limit(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 8 of issue 21: requests waiting for the engine are awaited on the event loop (none holds a thread of
    the pool every sync route shares), and a tenant over its concurrency limit gets a 429 naming the setting at
    once, while another tenant's request is taken."""
    from app.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_concurrent_generations_per_tenant", 2)
    # Every request through the one started client: all run on its event loop, whose thread pool is measured.
    a, b = ({"Authorization": _tenant(api, name).headers["Authorization"]} for name in ("busy-a", "busy-b"))
    client = api.client
    runtime = _runtime()
    body = {"model": TINY_MODEL_ID, "prompt": "Once upon", "max_tokens": 3}
    answers: list[Any] = []

    def post(key: dict[str, str]) -> None:
        answers.append(client.post("/v1/completions", json=body, headers=key))

    with scheduler_paused(runtime):
        threads = [threading.Thread(target=post, args=(key,)) for key in (a, a, b)]
        for thread in threads[:2]:
            thread.start()
        assert _until(lambda: len(runtime.pending) == 2, budget(10))
        limiter = client.portal.call(anyio.to_thread.current_default_thread_limiter)  # type: ignore[union-attr]
        assert _until(lambda: limiter.borrowed_tokens == 0, budget(5)), "a waiting request holds an API thread"
        over = client.post("/v1/completions", json=body, headers=a)
        assert over.status_code == 429, over.text
        assert error_of(over)["code"] == "too_many_concurrent_requests" and \
            "ADAPTERY_MAX_CONCURRENT_GENERATIONS_PER_TENANT" in error_of(over)["message"]
        assert int(over.headers["retry-after"]) >= 1
        threads[2].start()
        assert _until(lambda: len(runtime.pending) == 3, budget(10))  # tenant b is not limited by a
    for thread in threads:
        thread.join(timeout=UNLESS_BROKEN)
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert client.post("/v1/completions", json=body, headers=a).status_code == 200  # finished ones no longer count


def test_a_refused_generation_is_answered_without_a_thread_hop(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A noisy tenant's requests are mostly refused retries (bench/noisy_neighbour.py: some 70 a second): each is
    answered on the event loop. A hand-off to the thread pool passes the interpreter lock to a worker thread and
    back, and five of them per refusal (key check, settings, session, tenant, session close) made every other
    request of the API wait behind the refusals."""
    from app.services import tenants
    from app.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_concurrent_generations_per_tenant", 1)
    monkeypatch.setattr(tenants, "KEY_CACHE_SECONDS", 600)  # however slow this machine, the key stays cached
    key = {"Authorization": _tenant(api, "hops").headers["Authorization"]}
    client, runtime = api.client, _runtime()
    body = {"model": TINY_MODEL_ID, "prompt": "Once upon", "max_tokens": 2}
    answers: list[Any] = []
    with scheduler_paused(runtime):
        first = threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json=body, headers=key)))
        first.start()
        assert _until(lambda: len(runtime.pending) == 1, budget(10))
        assert client.get("/v1/models", headers=key).status_code == 200  # its key seen, as a retrying tenant's is
        hops: list[str] = []
        real = anyio.to_thread.run_sync

        async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
            hops.append(getattr(func, "__qualname__", repr(func)))
            return await real(func, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(anyio.to_thread, "run_sync", counted)
            over = client.post("/v1/completions", json=body, headers=key)
        assert over.status_code == 429 and error_of(over)["code"] == "too_many_concurrent_requests", over.text
        assert hops == []
    first.join(timeout=UNLESS_BROKEN)
    assert [a.status_code for a in answers] == [200]


def test_a_generation_past_the_timeout_is_ended_with_a_clear_error(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 8 of issue 21: a request not finished within ADAPTERY_GENERATION_TIMEOUT_SECONDS frees its row and
    answers a 504 naming the setting; a stream that has started ends with an error event."""
    from app.settings import get_settings

    monkeypatch.setattr(get_settings(), "generation_timeout_seconds", 0.5)
    client = api.client
    runtime = _runtime()
    body = {"model": TINY_MODEL_ID, "prompt": "Once upon", "max_tokens": 50, "temperature": 0}
    with scheduler_paused(runtime):
        late = client.post("/v1/completions", json=body)
        assert late.status_code == 504, late.text
        assert error_of(late)["code"] == "generation_timeout" and \
            "ADAPTERY_GENERATION_TIMEOUT_SECONDS" in error_of(late)["message"]
        assert runtime.pending and all(s.cancelled.is_set() for s in runtime.pending)  # its row is given up
    assert _until(lambda: not runtime.pending and not runtime.active, budget(10))

    # A stream that has started: the prefill answers, then every decode step stalls until the test ends.
    calls, release = [0], threading.Event()

    def stall(*_: Any) -> None:
        calls[0] += 1
        if calls[0] > 1:
            release.wait(timeout=UNLESS_BROKEN)

    hook = runtime.model.register_forward_pre_hook(stall)
    try:
        streamed = client.post("/v1/completions", json={**body, "stream": True})
    finally:
        release.set()
        hook.remove()
    assert streamed.status_code == 200
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"], events  # it had started
    assert "ADAPTERY_GENERATION_TIMEOUT_SECONDS" in json.loads(events[-1])["error"]["message"], events
    assert _until(lambda: not runtime.pending and not runtime.active, budget(10))


# ------------------------------------------------------------------ sampling and output fields (issue 23, item 1)


def test_sampling_fields_out_of_range_are_a_400_naming_the_field(client: TestClient) -> None:
    chat = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    text = {"model": TINY_MODEL_ID, "prompt": "hi", "max_tokens": 2}
    refused = [
        ("/v1/chat/completions", {**chat, "n": 0}, "n"),
        ("/v1/chat/completions", {**chat, "n": 9}, "n"),  # above ADAPTERY_MAX_CHOICES_PER_REQUEST (8)
        ("/v1/completions", {**text, "best_of": 3}, "best_of"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("/v1/completions", {**text, "logprobs": 6}, "logprobs"),
        ("/v1/chat/completions", {**chat, "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {**text, "frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/completions", {**text, "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {**text, "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {**text, "logit_bias": {"hello": 1}}, "logit_bias"),
        ("/v1/completions", {**text, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ("/v1/completions", {**text, "logit_bias": {"99999999": 1}}, "logit_bias"),  # outside the vocabulary
    ]
    for path, body, field in refused:
        answer = client.post(path, json=body)
        assert answer.status_code == 400 and error_of(answer)["param"] == field, (field, answer.text)
    # What ordinary clients send by default, spelt out, is taken.
    defaults = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "logprobs": False,
                "top_logprobs": None, "user": "someone", "stream_options": None}
    assert client.post("/v1/chat/completions", json={**chat, **defaults}).status_code == 200
    assert client.post("/v1/completions", json={**text, "best_of": 1, "logprobs": None}).status_code == 200


def test_n_choices_logprobs_and_usage(client: TestClient) -> None:
    """n=3: three choices with their index; usage counts the prompt once and every choice's tokens. Chat's and
    completions' logprobs have OpenAI's shapes, with one entry per generated token; a seeded request with n > 1 is
    the same twice, and its choices differ from each other."""
    chat = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 6,
            "n": 3, "seed": 5, "logprobs": True, "top_logprobs": 2}
    answer = client.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    single = client.post("/v1/chat/completions", json={**chat, "n": 1}).json()
    assert body["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    tokens = [len(choice["logprobs"]["content"]) for choice in body["choices"]]
    assert body["usage"]["completion_tokens"] == sum(tokens) and body["usage"]["total_tokens"] == \
        body["usage"]["prompt_tokens"] + sum(tokens)
    assert body["choices"][0]["message"] == single["choices"][0]["message"]  # choice 0 keeps the request's seed
    assert len({choice["message"]["content"] for choice in body["choices"]}) > 1
    assert [c["message"] for c in client.post("/v1/chat/completions", json=chat).json()["choices"]] == \
        [c["message"] for c in body["choices"]]
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
    assert len(entry["top_logprobs"]) == 2 and set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}

    text = client.post("/v1/completions", json={"model": TINY_MODEL_ID, "prompt": "Once upon", "max_tokens": 5,
                                                "temperature": 0, "logprobs": 2}).json()
    logprobs = text["choices"][0]["logprobs"]
    count = text["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == count
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0
    # greedy: the chosen token is the most likely one
    assert all(abs(lp - max(top.values())) < 1e-6 for lp, top in zip(logprobs["token_logprobs"],
                                                                         logprobs["top_logprobs"], strict=True))


def test_logit_bias_forces_a_token_and_streams_carry_logprobs_and_usage_for_every_choice(client: TestClient) -> None:
    from app.services.inference import get_engine
    from app.settings import get_settings

    tokenizer = get_engine(get_settings()).runtime(TINY_MODEL_ID).tokenizer
    forced = tokenizer(" story", add_special_tokens=False)["input_ids"][0]
    body = {"model": TINY_MODEL_ID, "prompt": "Once upon", "max_tokens": 4, "seed": 2, "n": 2, "logprobs": 0,
            "logit_bias": {str(forced): 100}, "presence_penalty": 1.5, "frequency_penalty": 0.5}
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    for choice in answer.json()["choices"]:
        assert choice["text"] == tokenizer.decode([forced] * 4)  # +100 wins over any penalty in range
        assert choice["logprobs"]["top_logprobs"] == [{}] * 4

    streamed = client.post("/v1/completions", json={**body, "logit_bias": None, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    texts, counts, finished = ["", ""], [0, 0], [None, None]
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
            counts[choice["index"]] += len((choice["logprobs"] or {}).get("tokens", []))
            finished[choice["index"]] = choice["finish_reason"] or finished[choice["index"]]
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["completion_tokens"] == sum(counts) > 0
    assert None not in finished
    plain = client.post("/v1/completions", json={**body, "logit_bias": None}).json()
    assert texts == [choice["text"] for choice in plain["choices"]]  # the same seed streamed or not


def test_choices_count_against_the_tenant_concurrency_limit() -> None:
    """Each choice of n is a generation against the tenant's limit: n above the limit is a 400 naming n, and a
    request whose n does not fit beside the tenant's running ones is a 429."""
    from app.errors import InvalidRequest, LimitReached
    from app.services import inference
    from app.settings import Settings

    settings = Settings(max_concurrent_generations_per_tenant=4, max_choices_per_request=8)
    with pytest.raises(InvalidRequest) as over:
        inference.check_choices(settings, 5)
    assert over.value.param == "n" and "ADAPTERY_MAX_CONCURRENT_GENERATIONS_PER_TENANT" in over.value.message
    inference.check_choices(settings, 4)
    first = inference.claim_generation(settings, "choices-tenant", 3)
    with pytest.raises(LimitReached):
        inference.claim_generation(settings, "choices-tenant", 2)
    inference.claim_generation(settings, "choices-tenant", 1).release()
    first.release()
    inference.claim_generation(settings, "choices-tenant", 4).release()


def test_the_openai_sdk_reads_choices_logprobs_and_usage_from_a_mixed_batch(api: Api, client: TestClient,
                                                                            tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    """The unchanged openai SDK (over the in-process app) parses n choices, both logprobs shapes and streamed usage,
    for an adapter and the base model in one batch with different sampling fields; seeded answers are the same as
    when each ran alone."""
    openai = pytest.importorskip("openai")
    key = client.headers["Authorization"].removeprefix("Bearer ")
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)
    adapter = _import(client, tiny_model_dir, tmp_path, 7)
    messages = [{"role": "user", "content": "Say hi"}]

    def chat() -> Any:
        return sdk.chat.completions.create(model=adapter, messages=messages, max_tokens=5, n=2, seed=4,  # type: ignore
                                           logprobs=True, top_logprobs=3, presence_penalty=0.5)

    def text() -> Any:
        return sdk.completions.create(model=TINY_MODEL_ID, prompt="Once upon", max_tokens=5, seed=9, logprobs=2,
                                      frequency_penalty=1.0, logit_bias={"5": -100})

    alone = (chat(), text())
    answers: list[Any] = [None, None]

    def run(index: int) -> None:
        answers[index] = (chat, text)[index]()

    runtime = _runtime()
    with scheduler_paused(runtime):
        threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        assert _until(lambda: len(runtime.pending) == 3, budget(10))  # two choices and one completion
    for thread in threads:
        thread.join(timeout=UNLESS_BROKEN)
    mixed_chat, mixed_text = answers
    assert [c.message.content for c in mixed_chat.choices] == [c.message.content for c in alone[0].choices]
    assert mixed_text.choices[0].text == alone[1].choices[0].text
    assert [c.index for c in mixed_chat.choices] == [0, 1]
    first = mixed_chat.choices[0].logprobs.content[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 3 and isinstance(first.bytes, list)
    assert mixed_chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in mixed_chat.choices)
    assert len(mixed_text.choices[0].logprobs.tokens) == mixed_text.usage.completion_tokens
    streamed = sdk.chat.completions.create(model=adapter, messages=messages, max_tokens=5, n=2, seed=4,  # type: ignore
                                           logprobs=True, presence_penalty=0.5, stream=True,
                                           stream_options={"include_usage": True})
    texts, usage = ["", ""], None
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
        usage = chunk.usage or usage
    assert texts == [c.message.content for c in alone[0].choices]
    assert usage is not None and usage.completion_tokens == alone[0].usage.completion_tokens
