"""/v1/feedback in this process: judgements appended to a tenant's preference dataset become a stored file a DPO or
KTO job takes; each append stores a new file and retires the old one unless a job still uses it; bad lines are named
with their field and change nothing; two appends at once both land; another tenant sees nothing."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Api, error_of
from tests.api.test_jobs import create_job
from tests.api.test_preference_jobs import feedback, pair
from tests.conftest import ADMIN_KEY
from tests.tiny_model import TINY_MODEL_ID


def append(client: TestClient, lines: list[dict[str, Any]], dataset: str = "playground") -> Any:
    return client.post("/v1/feedback", json={"dataset": dataset, "lines": lines})


def lines_of(client: TestClient, file_id: str) -> list[dict[str, Any]]:
    content = client.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200, content.text
    return [json.loads(line) for line in content.text.splitlines()]


def test_appends_grow_one_stored_file_a_dpo_job_takes(api: Api, client: TestClient) -> None:
    first = append(client, [pair(0)], "prefs")
    assert first.status_code == 200, first.text
    made = first.json()
    assert (made["object"], made["name"], made["format"], made["n_examples"], made["version"]) == \
        ("feedback_dataset", "prefs", "preference", 1, 1)
    stored = client.get(f"/v1/files/{made['file']}").json()
    assert (stored["filename"], stored["format"], stored["purpose"]) == ("prefs.jsonl", "preference", "fine-tune")

    grown = append(client, [pair(1), pair(2)], "prefs").json()
    assert (grown["n_examples"], grown["version"]) == (3, 2) and grown["file"] != made["file"]
    assert lines_of(client, grown["file"]) == [pair(0), pair(1), pair(2)]
    # The file the dataset moved past stays one append longer: a job created from it meanwhile still finds it.
    assert lines_of(client, made["file"]) == [pair(0)]
    third = append(client, [pair(3)], "prefs").json()
    assert client.get(f"/v1/files/{made['file']}").status_code == 404  # retired now: nothing used it
    assert lines_of(client, third["file"]) == [pair(i) for i in range(4)]

    # A job names the current file, and is paused: later appends leave that file as it is.
    api.broker.take()
    job = create_job(client, {"model": TINY_MODEL_ID, "training_file": third["file"], "method": {"type": "dpo"}})
    assert job.status_code == 200, job.text
    assert len(api.broker.take()) == 1
    assert client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/pause").status_code == 200
    for i in (4, 5, 6):
        after = append(client, [pair(i)], "prefs").json()
    assert after["n_examples"] == 7
    assert lines_of(client, third["file"]) == [pair(i) for i in range(4)]  # kept for the paused job
    listed = client.get("/v1/feedback").json()["data"]
    assert {(d["name"], d["file"], d["n_examples"]) for d in listed} >= {("prefs", after["file"], 7)}
    api.broker.take()


def test_a_retry_with_its_idempotency_key_appends_once(client: TestClient) -> None:
    key = {"Idempotency-Key": "feedback-click-1"}
    body = {"dataset": "once", "lines": [pair(0)]}
    first = client.post("/v1/feedback", json=body, headers=key)
    again = client.post("/v1/feedback", json=body, headers=key)
    assert first.status_code == again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json() and first.json()["n_examples"] == 1


def test_a_dataset_whose_file_its_owner_deleted_starts_over(client: TestClient) -> None:
    made = append(client, [pair(0), pair(1)], "restart").json()
    assert client.delete(f"/v1/files/{made['file']}").status_code == 200
    again = append(client, [pair(2)], "restart")
    assert again.status_code == 200, again.text
    assert (again.json()["n_examples"], again.json()["version"]) == (1, 2)
    assert lines_of(client, again.json()["file"]) == [pair(2)]


def test_an_append_that_loses_the_race_lands_on_the_winners_file(client: TestClient,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministically: while this append stores its file, another append moves the dataset; this one's move
    fails the version check, its file is deleted, and it stores its line again after the winner's."""
    from app.services import feedback as service

    append(client, [pair(0)], "race")
    store_with = service._store_with
    interleaved: list[int] = []

    def with_a_rival(*args: Any, **kwargs: Any) -> Any:
        stored = store_with(*args, **kwargs)
        if not interleaved:
            interleaved.append(1)
            assert append(client, [pair(1)], "race").status_code == 200  # the rival wins
        return stored

    monkeypatch.setattr(service, "_store_with", with_a_rival)
    files_before = {f["id"] for f in client.get("/v1/files", params={"limit": 100}).json()["data"]}
    ours = append(client, [pair(2)], "race")
    monkeypatch.undo()
    assert ours.status_code == 200, ours.text
    assert (ours.json()["n_examples"], ours.json()["version"]) == (3, 3)
    assert lines_of(client, ours.json()["file"]) == [pair(0), pair(1), pair(2)]
    listed = {f["id"] for f in client.get("/v1/files", params={"limit": 100}).json()["data"]}
    # The losing attempt's file is gone: what is new is the rival's file and ours.
    assert len(listed - files_before) == 2 and ours.json()["file"] in listed


def test_thumbs_go_to_a_feedback_dataset_a_kto_job_takes(api: Api, client: TestClient) -> None:
    made = append(client, [feedback(i, label=i % 2 == 0) for i in range(4)], "thumbs").json()
    assert (made["format"], made["n_examples"]) == ("feedback", 4)
    api.broker.take()
    job = create_job(client, {"model": TINY_MODEL_ID, "training_file": made["file"], "method": {
        "type": "lora", "lora": {"hyperparameters": {"objective": "kto"}}}})
    assert job.status_code == 200, job.text
    api.broker.take()


@pytest.mark.parametrize(("lines", "param", "says"), [
    # The request schema names the field of the line it cannot read...
    ([{"messages": [{"role": "user", "content": "hi"}]}], "lines[0].PreferenceLine.input", "Field required"),
    ([pair(0), pair(1, non_preferred_output=[{"role": "user", "content": "x"}])],
     "lines[1].PreferenceLine.non_preferred_output[0].role", "assistant"),
    # ...and the upload's line checks, what a schema cannot say.
    ([pair(0), pair(1, non_preferred_output=pair(1)["preferred_output"])], "lines[1]", "the same answer"),
    ([pair(0, input={"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]})],
     "lines[0]", "a system message may only come first"),
    ([pair(0), feedback(1)], "lines", "mix"),
    ([feedback(0)], "lines", "holds preference lines"),  # the dataset already holds pairs
    ([pair(i) for i in range(17)], "lines", "at most 16"),
])
def test_bad_lines_are_named_and_change_nothing(client: TestClient, lines: list[dict[str, Any]], param: str,
                                                says: str) -> None:
    assert append(client, [pair(0)], "strict").status_code == 200
    before = client.get("/v1/feedback").json()["data"]
    files_before = client.get("/v1/files", params={"limit": 100}).json()["data"]
    refused = append(client, lines, "strict")
    assert refused.status_code == 400, refused.text
    assert error_of(refused)["param"] == param and says in error_of(refused)["message"], refused.text
    assert client.get("/v1/feedback").json()["data"] == before
    assert client.get("/v1/files", params={"limit": 100}).json()["data"] == files_before


def test_a_dataset_name_is_checked(client: TestClient) -> None:
    for name in ("", "../x", "a" * 65, "has space"):
        refused = append(client, [pair(0)], name)
        assert refused.status_code == 400 and error_of(refused)["param"] == "dataset", name


def test_appends_at_once_all_land(client: TestClient) -> None:
    """Four threads append at once: each append that answers 200 is in the dataset's file, whichever order they won
    in (whether they raced is up to the scheduler; the test above makes the race happen)."""
    answers: list[int] = []

    def one(i: int) -> None:
        answers.append(append(client, [pair(100 + i)], "raced").status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    landed = answers.count(200)
    assert landed >= 1 and set(answers) <= {200, 409}, answers
    dataset = next(d for d in client.get("/v1/feedback").json()["data"] if d["name"] == "raced")
    assert dataset["n_examples"] == landed == dataset["version"]
    assert len(lines_of(client, dataset["file"])) == landed


def test_another_tenant_sees_nothing(api: Api, client: TestClient) -> None:
    append(client, [pair(0)], "mine")
    created = api.as_key(ADMIN_KEY).post("/v1/admin/tenants", json={"name": "feedback-b"})
    other = api.as_key(created.json()["api_key"])
    assert other.get("/v1/feedback").json()["data"] == []
    made = append(other, [pair(9)], "mine").json()  # the same name is a dataset of its own
    assert (made["n_examples"], made["version"]) == (1, 1)
    assert other.get(f"/v1/files/{made['file']}").status_code == 200
    ours = next(d for d in client.get("/v1/feedback").json()["data"] if d["name"] == "mine")
    assert ours["file"] != made["file"] and client.get(f"/v1/files/{made['file']}").status_code == 404
