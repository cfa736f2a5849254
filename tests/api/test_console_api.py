"""What the web console is built on, in this process (no browser; the browser tests are tests/e2e/test_console.py):
the page and its assets served at the root with no other origin, the methods' published schema (every bound it
publishes is one a job request is refused by, naming the field), and a file's length stats and preview."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from adapters.methods import METHODS
from tests.api.conftest import Api, Message, error_of
from tests.conftest import chat_lines, upload
from tests.tiny_model import TINY_MODEL_ID


def test_the_console_is_served_at_the_root_with_its_assets_and_no_other_origin(api: Api) -> None:
    anonymous = api.as_key(None)  # a browser before sign-in
    page = anonymous.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("console.js", "api.js", "chart.js", "console.css"):
        served = anonymous.get(f"/console/{asset}")
        assert served.status_code == 200, asset
        # No address of another origin (the SVG namespace is a name, never fetched).
        text = served.text.replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, asset
    assert anonymous.get("/console/missing.js").status_code == 404


def test_methods_publish_the_schema_requests_are_validated_with(api: Api, client: TestClient) -> None:
    training = upload(client, chat_lines(24), "console-methods.jsonl").json()["id"]
    listed = client.get("/v1/fine_tuning/methods", params={"model": TINY_MODEL_ID, "training_file": training})
    assert listed.status_code == 200, listed.text
    methods = listed.json()["data"]
    assert [m["id"] for m in methods] == list(METHODS)
    assert sum(m["default"] for m in methods) == 1
    api.broker.take()
    checked = 0
    for method in methods:
        # Every field has a default but the multiplier, which only scales the default learning rate.
        assert set(method["hyperparameters"]["properties"]) - set(method["defaults"]) == {"learning_rate_multiplier"}
        for name, schema in method["hyperparameters"]["properties"].items():
            outside = []
            if "maximum" in schema:
                outside.append(schema["maximum"] + 1)
            if "minimum" in schema:
                outside.append(schema["minimum"] - 1)
            if "exclusiveMinimum" in schema:
                outside.append(schema["exclusiveMinimum"])
            for value in outside:  # every published bound is one the API enforces, naming the field
                refused = client.post("/v1/fine_tuning/jobs", json={
                    "model": TINY_MODEL_ID, "training_file": training,
                    "method": {"type": method["id"], method["id"]: {"hyperparameters": {name: value}}}})
                assert refused.status_code == 400, (method["id"], name, value, refused.text)
                assert error_of(refused)["param"] == f"method.{method['id']}.hyperparameters.{name}"
                checked += 1
    assert checked >= 60
    assert api.broker.take() == []  # not one of them was sent

    # The defaults are what a job gets when it gives none.
    default = next(m for m in methods if m["default"])
    created = client.post("/v1/fine_tuning/jobs", json={"model": TINY_MODEL_ID, "training_file": training})
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["hyperparameters"] == default["defaults"] and job["method"]["type"] == default["id"]
    assert api.broker.take() == [Message("adaptery.train", job["id"], f"train.any.{TINY_MODEL_ID}")]
    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    # Without a file, the size-dependent defaults stay "auto"; an unknown model or file is a clear 404.
    plain = client.get("/v1/fine_tuning/methods").json()["data"][0]["defaults"]
    assert plain["n_epochs"] == "auto" and plain["batch_size"] == "auto"
    unknown = client.get("/v1/fine_tuning/methods", params={"model": "no-such-model"})
    assert unknown.status_code == 404 and error_of(unknown)["param"] == "model"
    missing = client.get("/v1/fine_tuning/methods", params={"training_file": "file-missing"})
    assert missing.status_code == 404 and error_of(missing)["param"] == "training_file"


def test_a_file_has_length_stats_and_a_preview_of_its_first_examples(client: TestClient) -> None:
    lines = [json.dumps({"prompt": "word " * n, "completion": " yes"}) for n in (1, 5, 50, 120)]
    response = upload(client, "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", "lengths.jsonl")
    assert response.status_code == 200, response.text
    created = response.json()
    stats = created["stats"]
    histogram = stats["length_histogram"]
    assert sum(histogram["counts"]) == 4 and len(histogram["bin_edges"]) == len(histogram["counts"]) + 1
    assert stats["max_tokens"] <= histogram["bin_edges"][-1] and stats["min_tokens"] < stats["max_tokens"]
    assert 0 < stats["trained_tokens"] < created["n_tokens"]
    assert client.get(f"/v1/files/{created['id']}").json()["stats"] == stats
    preview = client.get(f"/v1/files/{created['id']}/preview", params={"limit": 3}).json()["data"]
    # Line numbers are the file's own (line 3 is blank).
    assert [row["line"] for row in preview] == [1, 2, 4]
    assert [row["example"] for row in preview] == [json.loads(line) for line in lines[:3]]
    assert client.get(f"/v1/files/{created['id']}/preview", params={"limit": 0}).status_code == 400
    assert client.get("/v1/files/file-missing/preview").status_code == 404
