"""Model aliases, in this process: an alias is what an application calls; promoting another model to it or rolling
back changes what answers, at once, with every change in its history; aliases are each tenant's own and name no
other model; a model an alias points to cannot be deleted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.adapters_made_with_peft import files_of, save_lora, send_files
from tests.api.conftest import Api, error_of
from tests.conftest import ADMIN_KEY
from tests.tiny_model import TINY_MODEL_ID


@pytest.fixture(scope="module")
def versions(client: TestClient, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two imported versions of a model, different weights: their names."""
    names = []
    for seed in (1, 2):
        name = f"bot-v{seed}"
        response = send_files(client, files_of(save_lora(tiny_model_dir, tmp_path_factory.mktemp(name), seed=seed,
                                                         lora_alpha=64)), name=name)
        assert response.status_code == 200, response.text
        names.append(name)
    return names


def answer(client: TestClient, model: str) -> Any:
    reply = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 8, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Hello there"}]})
    return reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else reply.status_code


def test_promote_and_roll_back_change_what_answers_at_once(client: TestClient, versions: list[str]) -> None:
    v1, v2 = versions
    assert answer(client, v1) != answer(client, v2)  # the two versions answer differently
    created = client.put("/v1/aliases/support-bot", json={"model": v1})
    assert created.status_code == 200, created.text
    assert created.json()["model"] == v1 and created.json()["object"] == "model.alias"
    assert answer(client, "support-bot") == answer(client, v1)
    assert client.put("/v1/aliases/support-bot", json={"model": v2}).json()["model"] == v2
    assert answer(client, "support-bot") == answer(client, v2)
    rolled = client.post("/v1/aliases/support-bot/rollback")
    assert rolled.status_code == 200 and rolled.json()["model"] == v1, rolled.text
    assert answer(client, "support-bot") == answer(client, v1)
    history = client.get("/v1/aliases/support-bot").json()["history"]
    assert [(h["action"], h["model"]) for h in history] == [("promote", v1), ("promote", v2), ("rollback", v1)]
    assert history[1]["previous_adapter_id"] == history[0]["adapter_id"]
    assert "support-bot" in [a["id"] for a in client.get("/v1/aliases").json()["data"]]
    completion = client.post("/v1/completions", json={"model": "support-bot", "prompt": "Hi", "max_tokens": 2})
    assert completion.status_code == 200, completion.text


def test_aliases_name_nothing_else_and_say_what_is_wrong(api: Api, client: TestClient, versions: list[str],
                                                         tiny_model_dir: Path, tmp_path: Path) -> None:
    v1, v2 = versions
    for alias, status, code in ((v2, 409, "name_taken"), (TINY_MODEL_ID, 409, "name_taken"),
                                ("ft:mine", 400, "reserved_name"), ("bad name!", 400, "invalid_alias")):
        refused = client.put(f"/v1/aliases/{alias}", json={"model": v1})
        assert refused.status_code == status and error_of(refused)["code"] == code, refused.text
        assert error_of(refused)["param"] == "alias"
    missing = client.put("/v1/aliases/new-one", json={"model": "no-such-model"})
    assert missing.status_code == 404 and error_of(missing)["param"] == "model"
    unknown_field = client.put("/v1/aliases/new-one", json={"model": v1, "adapter": "x"})
    assert unknown_field.status_code in (400, 422) and "adapter" in unknown_field.text
    assert client.put("/v1/aliases/first-one", json={"model": v1}).status_code == 200
    first_rollback = client.post("/v1/aliases/first-one/rollback")
    assert first_rollback.status_code == 409 and error_of(first_rollback)["code"] == "no_previous_version"
    assert client.post("/v1/aliases/none-such/rollback").status_code == 404
    # An import may not take an alias's name; another tenant neither sees nor reaches it.
    taken = send_files(client, files_of(save_lora(tiny_model_dir, tmp_path)), name="first-one")
    assert taken.status_code == 409, taken.text
    admin = api.as_key(ADMIN_KEY)
    other = api.as_key(admin.post("/v1/admin/tenants", json={"name": "aliases-b"}).json()["api_key"])
    assert answer(other, "first-one") == 404
    assert other.get("/v1/aliases").json()["data"] == [] and other.get("/v1/aliases/first-one").status_code == 404
    assert other.put("/v1/aliases/first-one", json={"model": v1}).status_code == 404  # not B's model


def test_a_model_an_alias_points_to_is_kept(client: TestClient, versions: list[str]) -> None:
    v1, _ = versions
    assert client.put("/v1/aliases/keeper", json={"model": v1}).status_code == 200
    refused = client.delete(f"/v1/models/{v1}")
    assert refused.status_code == 409 and "keeper" in error_of(refused)["message"], refused.text
    by_alias = client.delete("/v1/models/keeper")
    assert by_alias.status_code == 404 and "/v1/aliases" in error_of(by_alias)["message"]
    removed = client.delete("/v1/aliases/keeper")
    assert removed.status_code == 200 and removed.json()["model"] == v1
    assert answer(client, "keeper") == 404 and answer(client, v1) != 404  # the model stays


def test_the_cli_sets_rolls_back_and_lists_aliases(client: TestClient, versions: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`adaptery aliases …` and `adaptery models delete`, against this in-process app (the CLI's HTTP client is
    the test client: the same requests, no port)."""
    from typer.testing import CliRunner

    from app import client_cli
    from app.cli import cli

    def in_process(self: Any, url: str, key: str | None, as_json: bool) -> None:
        self.url, self.as_json, self.http = url, as_json, client

    monkeypatch.setattr(client_cli.Api, "__init__", in_process)
    v1, v2 = versions

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, ["--json", *args])
        assert result.exit_code == 0, result.output
        return result.output

    assert '"model": "' + v2 in run("aliases", "set", "cli-bot", v2)
    assert '"model": "' + v1 in run("aliases", "set", "cli-bot", v1)
    assert '"model": "' + v2 in run("aliases", "rollback", "cli-bot")
    assert "cli-bot" in run("aliases", "list")
    assert run("aliases", "history", "cli-bot").count('"action"') == 3
    assert '"model": "' + v2 in run("aliases", "delete", "cli-bot")
    refused = CliRunner().invoke(cli, ["models", "delete", TINY_MODEL_ID])
    # The API's error, with the field it names (the `adaptery` entry point prints it as one line and exits 1).
    assert isinstance(refused.exception, client_cli.ClientError) and "(field: model)" in str(refused.exception)


def test_aliases_and_their_history_are_bounded(tmp_path: Path, tiny_model_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from app.services import aliases
    from tests.api.conftest import in_process_api

    monkeypatch.setattr(aliases, "ALIAS_HISTORY", 3)
    with in_process_api(tmp_path, tiny_model_dir, {"ADAPTERY_MAX_ALIASES_PER_TENANT": "2"}) as small:
        c = small.client
        names = []
        for seed in (1, 2):
            name = f"m{seed}"
            assert send_files(c, files_of(save_lora(tiny_model_dir, tmp_path / name, seed=seed)),
                              name=name).status_code == 200
            names.append(name)
        for alias in ("a1", "a2"):
            assert c.put(f"/v1/aliases/{alias}", json={"model": names[0]}).status_code == 200
        third = c.put("/v1/aliases/a3", json={"model": names[0]})
        assert third.status_code == 429 and error_of(third)["code"] == "too_many_aliases", third.text
        for step in range(5):  # changing an alias it has is always allowed; its history keeps the last 3
            assert c.put("/v1/aliases/a1", json={"model": names[step % 2]}).status_code == 200
        history = c.get("/v1/aliases/a1").json()["history"]
        assert len(history) == 3 and [h["model"] for h in history] == [names[0], names[1], names[0]]
        assert c.post("/v1/aliases/a1/rollback").json()["model"] == names[1]
