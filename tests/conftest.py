"""Shared fixtures: the tiny bundle (built once per session) and real servers on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import RedisInfo, S3Info, redis_server, s3_server

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tier markers come from the folder, so a test cannot be filed in one tier and marked as another.
    for item in items:
        tier = Path(str(item.fspath)).relative_to(_TESTS).parts[0]
        if tier in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle: the one `make test` built (NEXTGPT_TEST_BUNDLE), else built here once."""
    prebuilt = os.environ.get("NEXTGPT_TEST_BUNDLE")
    if prebuilt and Path(prebuilt, "bundle.json").is_file():
        return Path(prebuilt)
    from services.bundle.tiny.build import build_tiny_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    build_tiny_bundle(out, seed=0)
    return out


@pytest.fixture(scope="session")
def redis_info() -> Iterator[RedisInfo]:
    with redis_server() as info:
        yield info


@pytest.fixture(scope="session")
def s3_info() -> Iterator[S3Info]:
    with s3_server() as info:
        yield info
