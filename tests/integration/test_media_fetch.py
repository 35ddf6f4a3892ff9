"""The gateway's fetcher of media given by URL, against a real HTTP server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.media_fetch import MediaFetcher
from services.contracts.errors import InvalidRequestError, PayloadTooLargeError
from tests.support.files_server import PICTURE, Files, files_server


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with files_server() as port:
        yield port


async def _names(table: dict[str, list[str]], host: str, _port: int) -> list[str]:
    return table.get(host, [])


def _fetcher(allow_private: bool = True, max_bytes: int = 1_000_000, **names: list[str]) -> MediaFetcher:
    table = {"files.test": ["127.0.0.1"], **{k.replace("_", "."): v for k, v in names.items()}}
    return MediaFetcher(max_bytes, timeout_s=1.0, max_redirects=3, allow_private=allow_private,
                        resolver=lambda host, port: _names(table, host, port))


async def test_fetches_by_the_checked_address_with_the_host_kept(port: int) -> None:
    """The name is resolved once (by the resolver given: files.test exists nowhere else) and the connection goes
    to that address, the Host header still naming the host."""
    Files.hosts.clear()
    assert await _fetcher().fetch(f"http://files.test:{port}/pic.png", "p") == PICTURE
    assert Files.hosts == [f"files.test:{port}"]
    assert await _fetcher().fetch(f"http://127.0.0.1:{port}/hop/2", "p") == PICTURE  # three redirects: taken


async def test_private_addresses_are_refused_before_any_request(port: int) -> None:
    Files.hosts.clear()
    for url in (f"http://files.test:{port}/pic.png", f"http://127.0.0.1:{port}/pic.png"):
        with pytest.raises(InvalidRequestError) as info:
            await _fetcher(allow_private=False).fetch(url, "messages[0].content[1]")
        assert (info.value.code, info.value.param) == ("media_url_not_allowed", "messages[0].content[1]")
    assert Files.hosts == []
    fetcher = _fetcher(allow_private=False)
    for address in ("169.254.169.254", "10.1.2.3", "100.64.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "fe80::1%2"):
        assert not fetcher._allowed(address), address
    for address in ("93.184.216.34", "2606:4700:4700::1111"):
        assert fetcher._allowed(address), address
    mixed = _fetcher(allow_private=False, two_test=["93.184.216.34", "10.0.0.1"])  # one private address: refused
    with pytest.raises(InvalidRequestError, match="private or reserved address"):
        await mixed.fetch("http://two.test/pic.png", "p")


async def test_each_redirect_is_checked_again_and_bounded(port: int) -> None:
    with pytest.raises(InvalidRequestError, match="'nowhere.test' has no address"):
        await _fetcher().fetch(f"http://127.0.0.1:{port}/elsewhere", "p")
    with pytest.raises(InvalidRequestError, match="more than 3 redirects"):
        await _fetcher().fetch(f"http://127.0.0.1:{port}/hop/3", "p")


@pytest.mark.parametrize(("path", "error", "text"), [
    ("/missing", InvalidRequestError, "answered 404"),
    ("/declared-big", PayloadTooLargeError, "exceed 1000000 bytes"),
    ("/undeclared-big", PayloadTooLargeError, "exceed 1000000 bytes"),
    ("/slow", InvalidRequestError, "no answer within 1 s"),
])
async def test_failures_are_clear_and_name_the_part(port: int, path: str, error: type, text: str) -> None:
    with pytest.raises(error, match=text) as info:
        await _fetcher().fetch(f"http://127.0.0.1:{port}{path}", "messages[0].content[2]")
    assert info.value.param == "messages[0].content[2]"  # type: ignore[attr-defined]


async def test_a_requests_media_share_one_bound(port: int) -> None:
    url = f"http://127.0.0.1:{port}/pic.png"
    fetched = await _fetcher().fetch_all({"a": url, "b": url})
    assert fetched == {"a": PICTURE, "b": PICTURE}
    with pytest.raises(PayloadTooLargeError, match="fetched for this request"):
        await _fetcher(max_bytes=len(PICTURE) + 10).fetch_all({"a": url, "b": url})
    for url in ("ftp://files.test/pic.png", "http://user:pw@files.test/pic.png"):
        with pytest.raises(InvalidRequestError) as info:
            await _fetcher().fetch(url, "p")
        assert info.value.code == "unsupported_url"
