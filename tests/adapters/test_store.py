"""The artifact store against a real S3-compatible server (moto's standalone server, its own process): two
stores with different data dirs stand for two hosts sharing one bucket. What one publishes the other reads,
byte for byte; what was not completely published is never taken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, COMPLETE, ArtifactStore, IncompleteArtifact, ObjectStore
from tests.conftest import new_bucket

# End-to-end tier: the object store is moto's server, a process of its own.
pytestmark = pytest.mark.e2e


@pytest.fixture
def hosts(tmp_path: Path, s3_endpoint: str) -> tuple[ArtifactStore, ArtifactStore]:
    remote = ObjectStore(f"s3://{new_bucket(s3_endpoint)}/artifacts", s3_endpoint)
    return ArtifactStore(tmp_path / "host-a", remote), ArtifactStore(tmp_path / "host-b", remote)


def adapter_folder(store: ArtifactStore, weights: bytes) -> Path:
    staging = store.staging_dir()
    (staging / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (staging / ADAPTER_WEIGHTS).write_bytes(weights)
    return staging


def test_a_file_stored_on_one_host_is_read_on_another(hosts: tuple[ArtifactStore, ArtifactStore]) -> None:
    a, b = hosts
    content = b'{"text": "hello"}\n' * 1000
    a.write_file("file-abc", content)
    assert not b.file_path("file-abc").exists()
    assert b.read_file("file-abc") == content  # fetched, then kept as b's working copy
    assert b.file_path("file-abc").read_bytes() == content
    a.delete_file("file-abc")
    assert not a.remote.exists("files/file-abc.jsonl")  # type: ignore[union-attr]


def test_an_adapter_published_on_one_host_is_served_from_another(hosts: tuple[ArtifactStore, ArtifactStore]
                                                                 ) -> None:
    a, b = hosts
    weights = bytes(range(256)) * 4096  # 1 MiB
    a.publish_adapter(adapter_folder(a, weights), "adapter-one")
    folder = b.fetch_adapter("adapter-one")
    assert (folder / ADAPTER_WEIGHTS).read_bytes() == weights
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert b.adapter_size("adapter-one") == a.adapter_size("adapter-one")
    a.delete_adapter("adapter-one")
    assert a.remote.names("adapters/adapter-one") == []  # type: ignore[union-attr]


def test_a_publish_that_did_not_finish_is_never_taken(hosts: tuple[ArtifactStore, ArtifactStore],
                                                      tmp_path: Path) -> None:
    a, b = hosts
    remote = a.remote
    assert remote is not None
    folder = adapter_folder(a, b"weights")
    # The files reached the store, the COMPLETE marker did not (the publisher died in between).
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        remote.put(f"adapters/adapter-half/{name}", folder / name)
    with pytest.raises(IncompleteArtifact):
        b.fetch_adapter("adapter-half")
    assert not b.adapter_dir("adapter-half").exists()


def test_the_newest_complete_checkpoint_is_fetched_for_resuming(hosts: tuple[ArtifactStore, ArtifactStore]) -> None:
    from workers.training import checkpoints

    a, b = hosts
    root = a.checkpoint_dir("ftjob-one")
    for step in (5, 10):
        folder = checkpoints.step_folder(root, step)
        folder.mkdir(parents=True)
        (folder / checkpoints.STATE_JSON).write_text(json.dumps({"step": step, "epoch": 0, "batch": step,
                                                                 "trained_tokens": 100 * step}))
        (folder / checkpoints.STATE_TENSORS).write_bytes(b"tensors %d" % step)
        (folder / COMPLETE).write_text("ok\n")
        a.publish_checkpoint("ftjob-one", folder)
    # Step 15 was being uploaded when its host died: files without the marker.
    remote = a.remote
    assert remote is not None
    remote.put_bytes("checkpoints/ftjob-one/step-00000015/trainer_state.json", b"{}")

    assert checkpoints.latest(b.checkpoint_dir("ftjob-one")) is None
    b.fetch_checkpoint("ftjob-one")
    resume = checkpoints.latest(b.checkpoint_dir("ftjob-one"))
    assert resume is not None and resume.step == 10 and resume.trained_tokens == 1000
    assert (resume.folder / checkpoints.STATE_TENSORS).read_bytes() == b"tensors 10"
    b.fetch_checkpoint("ftjob-one", "step-00000005")  # an earlier one by name (early stopping's best step)
    assert (checkpoints.step_folder(b.checkpoint_dir("ftjob-one"), 5) / COMPLETE).is_file()


def test_a_bad_store_url_is_refused_with_the_accepted_shape() -> None:
    with pytest.raises(ValueError, match="s3://bucket"):
        ObjectStore("https://example.invalid/bucket")
