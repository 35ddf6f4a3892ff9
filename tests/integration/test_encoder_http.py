"""The encoder service over real HTTP (uvicorn on loopback) through HttpEncoderClient."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.bundle.loader import load_bundle
from services.clients.encoder_http import HttpEncoderClient
from services.contracts.encoder import MediaInput, unpack_result
from services.contracts.errors import (
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnsupportedMediaError,
)
from services.contracts.settings import EncoderSettings
from services.encoder.app import build_encoder_app
from services.encoder.compose import build_encoder_service
from services.storage.local import LocalArtifactStore
from tests.support import media
from tests.support.servers import UvicornThread, wait_until

SETTINGS = EncoderSettings(max_files=4, max_file_bytes=2_000_000, max_audio_seconds=30, max_wait_ms=20)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path_factory.mktemp("store"), 10_000_000)


@pytest.fixture(scope="module")
def server(tiny_bundle_dir: Path, store: LocalArtifactStore) -> Iterator[tuple[UvicornThread, threading.Event]]:
    release = threading.Event()
    registry = CollectorRegistry()

    def load():  # type: ignore[no-untyped-def]
        release.wait(60)  # lets a test see /readyz before the model is loaded
        return build_encoder_service(load_bundle(tiny_bundle_dir), SETTINGS, registry, store)

    app = build_encoder_app(load, registry, SETTINGS.max_request_bytes)
    with UvicornThread(app) as thread:
        yield thread, release


@pytest.fixture(scope="module")
def url(server: tuple[UvicornThread, threading.Event]) -> str:
    thread, release = server
    first = httpx.get(f"{thread.url}/readyz")
    assert first.status_code == 503 and first.json()["error"]["code"] == "not_ready"
    release.set()
    wait_until(lambda: httpx.get(f"{thread.url}/readyz").status_code == 200, 60, "encoder ready")
    return thread.url


async def _client(url: str) -> HttpEncoderClient:
    return HttpEncoderClient(url, httpx.AsyncClient())


async def test_encode_multipart_and_json(url: str) -> None:
    client = await _client(url)
    items = [MediaInput(name="cat.png", data=media.png()), MediaInput(name="dog.wav", data=media.wav()),
             MediaInput(name="clip.mp4", data=media.mp4())]
    result = await client.encode(items)
    assert result.embeddings.shape == (3, 128) and result.embeddings.dtype == np.float32
    assert result.modalities == ["image", "audio", "video"]
    files = [("files", ("cat.png", media.png(), "image/png"))]
    as_json = httpx.post(f"{url}/v1/encode", files=files, headers={"accept": "application/json"}).json()
    assert np.allclose(np.array(as_json["embeddings"])[0], result.embeddings[0], atol=1e-5)
    await client.check_ready()


async def test_phone_photo_formats_are_pictures(url: str) -> None:
    client = await _client(url)
    items = [MediaInput(name=f"photo.{fmt.lower()}", data=media.still(fmt)) for fmt in ("HEIF", "AVIF", "PNG")]
    result = await client.encode(items)
    assert result.modalities == ["image", "image", "image"]
    for embedding in result.embeddings[:2]:  # the same picture, through a lossy codec
        cosine = embedding @ result.embeddings[2] / np.linalg.norm(embedding) / np.linalg.norm(result.embeddings[2])
        assert cosine > 0.99


async def test_an_animated_gif_is_a_clip(url: str) -> None:
    """An animated GIF or APNG goes through the video branch (a still one stays a picture): as an MP4 of the
    same frames does."""
    frames = np.stack([np.roll(media.smooth(96, 64), 8 * i, axis=1) for i in range(16)])  # panning right
    client = await _client(url)
    items = [MediaInput(name="pan.gif", data=media.animation("GIF", frames)),
             MediaInput(name="pan.png", data=media.animation("PNG", frames)),
             MediaInput(name="pan.mp4", data=media.mp4_of(frames)),
             MediaInput(name="still.gif", data=media.still("GIF", frames[0]))]
    result = await client.encode(items)
    assert result.modalities == ["video", "video", "video", "image"]
    for embedding in result.embeddings[:2]:  # the same clip (the MP4 through a lossy codec, the GIF a palette)
        cosine = embedding @ result.embeddings[2] / np.linalg.norm(embedding) / np.linalg.norm(result.embeddings[2])
        assert cosine > 0.999  # (a still picture of the first frame: 0.986)


async def test_encode_object_store_keys(url: str, store: LocalArtifactStore) -> None:
    key = store.put_new("upload", media.png(seed=3), "image/png", suffix=".png").key
    client = await _client(url)
    by_key = await client.encode([MediaInput(name=key, key=key)])
    by_upload = await client.encode([MediaInput(name="x.png", data=media.png(seed=3))])
    assert np.allclose(by_key.embeddings, by_upload.embeddings, atol=1e-6)
    with pytest.raises(NotFoundError):
        await client.encode([MediaInput(name="k", key="upload/2020/01/01/" + "0" * 32)])
    with pytest.raises(InvalidRequestError, match="invalid artifact key"):
        await client.encode([MediaInput(name="k", key="../../etc/passwd")])


@pytest.mark.parametrize(
    ("item", "error", "text"),
    [
        (MediaInput(name="empty.png", data=b""), InvalidRequestError, "empty.png: file is empty"),
        (MediaInput(name="cut.png", data=media.png()[:300]), InvalidRequestError, "cut.png"),
        (MediaInput(name="sound.png", data=media.wav(), modality="image"), UnsupportedMediaError,
         "sound.png: declared image but the content is audio"),
        (MediaInput(name="notes.txt", data=b"just some text here"), UnsupportedMediaError, "notes.txt"),
        (MediaInput(name="cut.wav", data=media.wav()[:60]), InvalidRequestError, "cut.wav"),
        (MediaInput(name="long.wav", data=media.wav(seconds=40, rate=8000)), PayloadTooLargeError, "long.wav"),
        (MediaInput(name="cut.mp4", data=media.mp4()[:500]), InvalidRequestError, "cut.mp4"),
    ],
)
async def test_bad_media_is_a_clear_4xx(url: str, item: MediaInput, error: type, text: str) -> None:
    client = await _client(url)
    with pytest.raises(error) as info:
        await client.encode([item])
    assert text in info.value.message
    assert info.value.param == item.name


def test_limits_on_count_and_size(url: str) -> None:
    too_many = [("files", (f"{i}.png", media.png(8, 8, seed=i), "image/png")) for i in range(5)]
    response = httpx.post(f"{url}/v1/encode", files=too_many)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_files"
    assert response.json()["error"]["param"] == "files" and "NEXTGPT_ENCODER__MAX_FILES" in response.text
    huge = [("files", ("big.png", b"\x89PNG\r\n\x1a\n" + b"0" * (SETTINGS.max_request_bytes + 10), "image/png"))]
    response = httpx.post(f"{url}/v1/encode", files=huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    big = [("files", ("big.png", b"\x89PNG\r\n\x1a\n" + b"0" * 2_100_000, "image/png"))]
    response = httpx.post(f"{url}/v1/encode", files=big)
    assert response.status_code == 413 and response.json()["error"]["param"] == "big.png"
    bad_json = httpx.post(f"{url}/v1/encode", files=[("files", ("a.png", media.png(), "image/png"))],
                          data={"request": "{not json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["param"] == "request"
    plain = httpx.post(f"{url}/v1/encode", content=b"raw", headers={"content-type": "text/plain"})
    assert plain.status_code == 400


async def test_bad_request_does_not_hurt_concurrent_good_ones(url: str) -> None:
    client = await _client(url)
    good = [client.encode([MediaInput(name=f"g{i}.png", data=media.png(seed=i))]) for i in range(6)]
    bad = [client.encode([MediaInput(name="bad.png", data=media.png()[:100])]) for _ in range(3)]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results[:6])
    assert all(isinstance(r, InvalidRequestError) for r in results[6:])
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_metrics(url: str) -> None:
    httpx.post(f"{url}/v1/encode", files=[("files", ("a.png", media.png(), "image/png"))])
    text = httpx.get(f"{url}/metrics").text
    assert 'nextgpt_encoder_items_total{modality="image"}' in text
    assert "nextgpt_encoder_batch_size_bucket" in text and "nextgpt_encoder_rejected_total" in text


async def test_unreachable_encoder_is_503() -> None:
    client = HttpEncoderClient("http://127.0.0.1:9", httpx.AsyncClient())
    with pytest.raises(ServiceUnavailableError, match="encoder is unreachable"):
        await client.encode([MediaInput(name="a.png", data=media.png())])


def test_wire_format_roundtrip(url: str) -> None:
    response = httpx.post(f"{url}/v1/encode", files=[("files", ("a.png", media.png(), "image/png"))])
    assert response.headers["content-type"] == "application/vnd.nextgpt.safetensors"
    result = unpack_result(response.content)
    assert result.modalities == ["image"] and result.embeddings.shape == (1, 128)
