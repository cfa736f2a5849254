"""/v1/files in this process: a file's whole life (upload, read, list, download, delete, and its stored copy
gone), and every kind of bad dataset refused with the lines and the field named, leaving nothing stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Api, error_of
from tests.conftest import chat_lines, upload


def stored_files(data_dir: Path) -> set[Path]:
    folder = data_dir / "files"
    return set(folder.glob("*")) if folder.exists() else set()


def listed_ids(client: TestClient) -> set[str]:
    return {f["id"] for f in client.get("/v1/files").json()["data"]}


def test_file_lifecycle(api: Api, client: TestClient) -> None:
    content = chat_lines(3) + "\n\n"
    created = upload(client, content, filename="../../etc/my data.jsonl")
    assert created.status_code == 200, created.text
    file = created.json()
    assert file["object"] == "file" and file["status"] == "processed" and file["purpose"] == "fine-tune"
    assert file["format"] == "chat" and file["n_examples"] == 3 and file["n_tokens"] > 30
    assert file["bytes"] == len(content.encode())
    assert file["filename"] == "my data.jsonl"  # a display name only: no path survives
    assert client.get(f"/v1/files/{file['id']}").json() == file
    assert file["id"] in listed_ids(client)
    assert client.get(f"/v1/files/{file['id']}/content").content == content.encode()
    stored = api.data_dir / "files" / f"{file['id']}.jsonl"
    assert stored.read_bytes() == content.encode()  # where it is kept, under its id, not its name
    deleted = client.delete(f"/v1/files/{file['id']}")
    assert deleted.json() == {"id": file["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file['id']}").status_code == 404
    assert file["id"] not in listed_ids(client)
    assert not stored.exists()


BAD_FILES = [
    ("not utf-8", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', ["line 2", "UTF-8"]),
    ("not json", b'{"text": "ok"}\n{"text": \n', ["line 2", "not valid JSON"]),
    ("empty", b"\n\n", ["empty"]),
    ("mixed formats", b'{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', ["mixed formats", "line 2"]),
    ("wrong role", b'{"messages": [{"role": "bot", "content": "x"}]}\n', ["line 1", "accepted roles"]),
    ("missing field", b'{"prompt": "p", "completion": ""}\n{"prompt": "p", "completion": "c"}\n',
     ["line 1", "completion"]),
    ("no assistant", b'{"messages": [{"role": "user", "content": "x"}]}\n', ["line 1", "assistant"]),
    ("too many tokens", ('{"text": "ok"}\n' + json.dumps({"text": "word " * 5000}) + "\n").encode(),
     ["line 2", "tokens", "limit"]),
]


@pytest.mark.parametrize(("case", "content", "expected"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_refused_and_nothing_is_stored(api: Api, client: TestClient, case: str, content: bytes,
                                                     expected: list[str]) -> None:
    before, stored_before = listed_ids(client), stored_files(api.data_dir)
    response = upload(client, content)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "file" and error["type"] == "invalid_request_error"
    for fragment in expected:
        assert fragment in error["message"], error["message"]
    assert listed_ids(client) == before
    assert stored_files(api.data_dir) == stored_before


def test_many_bad_lines_are_listed_up_to_twenty(client: TestClient) -> None:
    content = "".join('{"text": ""}\n' for _ in range(25)).encode()
    response = upload(client, content)
    assert response.status_code == 400, response.text
    message = error_of(response)["message"]
    assert "line 1:" in message and "line 20:" in message
    assert "line 21:" not in message and "and 5 more problem(s)" in message


def test_upload_with_wrong_purpose(client: TestClient) -> None:
    before = listed_ids(client)
    response = client.post("/v1/files", data={"purpose": "assistants"},
                           files={"file": ("a.jsonl", chat_lines(2).encode())})
    assert response.status_code == 400 and error_of(response)["param"] == "purpose"
    assert listed_ids(client) == before
