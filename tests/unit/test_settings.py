from __future__ import annotations

import pytest

from services.contracts.errors import ConfigurationError
from services.contracts.settings import load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NEXTGPT_PORT", "NEXTGPT_STORAGE__BACKEND"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.port == 8000 and settings.storage.backend == "local" and settings.host == "127.0.0.1"


def test_nested_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTGPT_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("NEXTGPT_STORAGE__S3_BUCKET", "artifacts")
    monkeypatch.setenv("NEXTGPT_REDIS__URL", "redis://10.0.0.1:6379/2")
    settings = load_settings()
    assert settings.storage.s3_bucket == "artifacts" and settings.redis.url.endswith("/2")


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("NEXTGPT_PORT", "eighty", "NEXTGPT_PORT"),
        ("NEXTGPT_STORAGE__PRESIGN_TTL_S", "5", "NEXTGPT_STORAGE__PRESIGN_TTL_S"),
        ("NEXTGPT_LOG_LEVEL", "loud", "NEXTGPT_LOG_LEVEL"),
        ("NEXTGPT_REDIS__URL", "http://x", "NEXTGPT_REDIS__URL"),
        ("NEXTGPT_STORAGE__BACKEND", "s3", "NEXTGPT_STORAGE__S3_BUCKET"),
    ],
)
def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str, named: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert named in info.value.message


def test_overrides_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTGPT_PORT", "9000")
    assert load_settings(port=9100).port == 9100
