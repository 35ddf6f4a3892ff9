"""One contract, two stores: the same tests run on a local folder and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.contracts.errors import InvalidRequestError, PayloadTooLargeError, ServiceUnavailableError
from services.contracts.settings import StorageSettings
from services.contracts.storage import ArtifactNotFoundError, ArtifactStore, new_key
from services.storage.local import LocalArtifactStore
from services.storage.s3 import S3ArtifactStore
from tests.support.servers import S3Info

LIMIT = 1024 * 1024


def _s3_store(s3_info: S3Info, **overrides: object) -> S3ArtifactStore:
    settings = StorageSettings(
        backend="s3", s3_endpoint_url=s3_info.endpoint_url, s3_bucket=f"t-{uuid.uuid4().hex[:12]}",
        s3_access_key_id=s3_info.access_key, s3_secret_access_key=s3_info.secret_key, s3_create_bucket=True,
        s3_prefix="artifacts/", max_object_bytes=LIMIT, **overrides,
    )
    return S3ArtifactStore.from_settings(settings)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield LocalArtifactStore(tmp_path / "artifacts", LIMIT)
    else:
        yield _s3_store(request.getfixturevalue("s3_info"))


def test_put_head_read_roundtrip(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 1000
    meta = store.put_new("image", data, "image/png", suffix=".png", metadata={"seed": "7", "steps": "4"})
    assert meta.key.startswith("image/") and meta.key.endswith(".png")
    assert meta.size == len(data)
    head = store.head(meta.key)
    assert (head.mime, head.size, head.metadata) == ("image/png", len(data), {"seed": "7", "steps": "4"})
    assert store.read(meta.key) == data
    assert b"".join(store.iter_bytes(meta.key, chunk_size=1000)) == data
    assert store.exists(meta.key)


def test_ranges(store: ArtifactStore) -> None:
    data = b"0123456789" * 10
    key = store.put_new("audio", data, "audio/wav", suffix=".wav").key
    assert store.read(key, 10, 20) == data[10:20]
    assert store.read(key, 95) == data[95:]
    assert store.read(key, 0, 1) == b"0"
    assert store.read(key, 50, 50) == b""


def test_missing_key_is_not_found(store: ArtifactStore) -> None:
    key = new_key("video", ".mp4")
    with pytest.raises(ArtifactNotFoundError):
        store.head(key)
    with pytest.raises(ArtifactNotFoundError):
        store.read(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing key is fine


def test_delete(store: ArtifactStore) -> None:
    key = store.put_new("image", b"x", "image/png").key
    store.delete(key)
    assert not store.exists(key)


def test_put_same_key_replaces_not_duplicates(store: ArtifactStore) -> None:
    job = uuid.uuid4().hex
    key = new_key("image", ".png", uid=job)
    store.put(key, b"first", "image/png")
    store.put(key, b"second", "image/png")
    assert store.read(key) == b"second"
    assert new_key("image", ".png", uid=job) == key


@pytest.mark.parametrize(
    "key",
    ["../etc/passwd", "image/../../x", "/abs/path", "image/2026/01/01/../../../../x",
     "image/2026/01/01/" + "g" * 32, "IMAGE/2026/01/01/" + "a" * 32, "", "image/2026/01/01/" + "a" * 32 + "/x"],
)
def test_keys_from_outside_are_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(InvalidRequestError):
        store.head(key)
    with pytest.raises(InvalidRequestError):
        store.put(key, b"x", "text/plain")


def test_size_limit(store: ArtifactStore) -> None:
    with pytest.raises(PayloadTooLargeError):
        store.put_new("video", b"x" * (LIMIT + 1), "video/mp4")


def test_bad_metadata_refused(store: ArtifactStore) -> None:
    with pytest.raises(InvalidRequestError):
        store.put_new("image", b"x", "image/png", metadata={"Bad Name": "v"})
    with pytest.raises(InvalidRequestError):
        store.put_new("image", b"x", "image/png", metadata={"k": "é"})


def test_concurrent_puts_keep_every_object(store: ArtifactStore) -> None:
    results: dict[str, bytes] = {}
    lock = threading.Lock()

    def work(i: int) -> None:
        payload = f"object-{i}".encode() * 100
        key = store.put_new("image", payload, "image/png").key
        with lock:
            results[key] = payload

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    for key, payload in results.items():
        assert store.read(key) == payload


def test_s3_presigned_url_serves_bytes(s3_info: S3Info) -> None:
    store = _s3_store(s3_info)
    key = store.put_new("image", b"PNGDATA", "image/png", suffix=".png").key
    url = store.presigned_url(key, 300)
    assert url is not None and url.startswith(s3_info.endpoint_url)
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"PNGDATA"
    assert httpx.get(url.replace("Signature=", "Signature=0")).status_code == 403


def test_s3_wrong_credentials_fail_health(s3_info: S3Info) -> None:
    good = _s3_store(s3_info)
    bad = S3ArtifactStore.from_settings(StorageSettings(
        backend="s3", s3_endpoint_url=s3_info.endpoint_url, s3_bucket=good.bucket,
        s3_access_key_id=s3_info.access_key, s3_secret_access_key="wrong-secret",
    ))
    good.check_health()
    with pytest.raises(ServiceUnavailableError):
        bad.check_health()


def test_local_store_has_no_presigned_url(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path, LIMIT)
    key = store.put_new("image", b"x", "image/png").key
    assert store.presigned_url(key, 60) is None
    # Objects stay under the root: nothing was written outside it.
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in tmp_path.rglob("*"))


def test_retention_sweeps_old_objects_of_each_kind(store: ArtifactStore) -> None:
    from datetime import datetime, timedelta, timezone

    from services.storage.retention import Retention, RetentionPolicy

    old = [store.put_new(kind, b"x", "application/octet-stream").key for kind in ("conditioning", "image")]
    kept_audio = store.put_new("audio", b"x", "audio/wav").key
    retention = Retention(store, RetentionPolicy(conditioning_s=120, artifacts_s=3600))
    # Two minutes later: the conditioning is past its retention, the media are not.
    assert retention.sweep(datetime.now(timezone.utc) + timedelta(seconds=180)) == \
        {"conditioning": 1, "image": 0, "video": 0, "audio": 0}
    assert not store.exists(old[0]) and store.exists(old[1]) and store.exists(kept_audio)
    assert retention.sweep(datetime.now(timezone.utc) + timedelta(hours=2))["image"] == 1
    assert not store.exists(old[1]) and not store.exists(kept_audio)


def test_s3_lifecycle_rules_where_the_server_has_them(s3_info: S3Info) -> None:
    """Whole-day retentions become the bucket's lifecycle rules (merged with the bucket's own); a server without
    them answers an error, and the sweeper does the work instead (the test above sweeps this server too)."""
    store = _s3_store(s3_info)
    assert store.expire_natively("conditioning", 1)  # SeaweedFS has lifecycle rules
    rules = store.client.get_bucket_lifecycle_configuration(Bucket=store.bucket)["Rules"]
    assert any(r["Filter"]["Prefix"] == "artifacts/conditioning/" and r["Expiration"]["Days"] == 1 for r in rules)
    assert store.expire_natively("image", 7)  # a second rule keeps the first
    rules = store.client.get_bucket_lifecycle_configuration(Bucket=store.bucket)["Rules"]
    assert {r["Filter"]["Prefix"] for r in rules} >= {"artifacts/conditioning/", "artifacts/image/"}


def test_an_s3_that_stops_answering_is_unavailable_to_readers(s3_info: S3Info) -> None:
    # A store that takes connections and answers nothing: a listening socket nobody accepts from. Reads (a
    # download's head and bytes) are a ServiceUnavailableError, a 503 to retry (they were a 500); writes keep
    # botocore's error, which a decoder worker counts as transient.
    import socket

    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    with socket.create_server(("127.0.0.1", 0)) as silent:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                              region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s",
                              config=Config(connect_timeout=1, read_timeout=0.5, retries={"max_attempts": 1}))
        store = S3ArtifactStore(client, "bucket", "", LIMIT)
        key = new_key("image", ".png")
        for read in (lambda: store.head(key), lambda: store.read(key)):
            with pytest.raises(ServiceUnavailableError) as caught:
                read()
            assert caught.value.code == "storage_unavailable" and caught.value.retry_after_s
        with pytest.raises(BotoCoreError):
            store.put(key, b"x", "image/png")
