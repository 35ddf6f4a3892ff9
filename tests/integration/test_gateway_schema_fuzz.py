"""Property-based requests generated from the gateway's own OpenAPI document (schemathesis): whatever a client
sends, valid or not, the gateway never answers 5xx, rejects what the schema forbids, and every answer matches
the documented status codes, content types, headers and schemas. Runs against the embedded stack over real HTTP, with an API key."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.bundle.loader import load_bundle
from services.cli.compose import embedded_app
from services.contracts.settings import Settings
from tests.support.embedded import engines_here
from tests.support.servers import UvicornThread

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def url(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Tight bounds keep each generated case short: long generations and big decodes are refused or cut.
    settings_ = Settings(cache_dir=tmp_path_factory.mktemp("cache"), api_keys=KEY,
                         llm={"max_tokens": 8}, decoders={"time_limit_s": 5, "max_queued": 4},
                         gateway={"max_upload_bytes": 200_000, "heartbeat_s": 1.0})
    with UvicornThread(embedded_app(engines_here(settings_), load_bundle(tiny_bundle_dir))) as server:
        yield server.url


def test_every_operation_has_its_own_id(url: str) -> None:
    """Client generators key operations by id: GET and HEAD of one route must not share theirs."""
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert {paths["/readyz"]["get"]["operationId"], paths["/readyz"]["head"]["operationId"]} == \
        {"readyz_readyz_get", "readyz_readyz_head"}


@pytest.mark.parametrize("path", ["/v1/chat", "/v1/chat/completions", "/v1/chat/streams/{stream_id}",
                                  "/v1/artifacts/{key}", "/v1/jobs/{job_id}", "/v1/models", "/healthz", "/readyz"])
def test_no_server_error_and_no_schema_violation(url: str, path: str) -> None:
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json())
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().path == path]
    assert operations, f"{path} is not in the OpenAPI document"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            # Some cases with the key, some without: both paths must hold to the documented contract.
            headers = {"authorization": f"Bearer {KEY}"} if zlib.crc32(repr(case.body).encode()) % 4 else None
            # Not checked: "a schema-valid request is accepted". The chat routes validate more than a schema can
            # say (the model must exist, named files must be uploaded, the `request` part is JSON in a string).
            case.call_and_validate(base_url=url, headers=headers, timeout=120,
                                   excluded_checks=[positive_data_acceptance])

        check()
