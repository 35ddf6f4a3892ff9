"""Media the OpenAI endpoint is given by http(s) URL (``image_url``, ``video_url``), fetched by the gateway.

A server that fetches URLs its clients name can be made to reach what only it can reach (server-side request
forgery: a cloud's metadata service, an admin port on the pod network). So every hop is checked before it is
taken: only http and https; every address the host resolves to must be a public one (unless the operator allows
private networks); the connection goes to the address that was checked, not to a second lookup (DNS rebinding), with
the host name kept for the Host header and TLS; redirects are followed by hand, each one checked again, a few at
most; the body is read up to a byte bound within one deadline. No cookie, credential or proxy is used.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from services.contracts.errors import InvalidRequestError, PayloadTooLargeError

Resolve = Callable[[str, int], Awaitable[list[str]]]
_REDIRECTS = (301, 302, 303, 307, 308)


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses, as the system resolver gives them."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class MediaFetcher:
    def __init__(self, max_bytes: int, timeout_s: float, max_redirects: int, allow_private: bool,
                 resolver: Resolve = resolve) -> None:
        self.max_bytes, self.timeout_s, self.max_redirects = max_bytes, timeout_s, max_redirects
        self.allow_private, self.resolver = allow_private, resolver

    async def fetch_all(self, urls: dict[str, str]) -> dict[str, bytes]:
        """Each part's bytes (``urls``: part -> URL), fetched at once and together within ``max_bytes`` (the bound
        a request's data URLs have together, as its body); the first failure stops the others."""
        budget = _Budget(self.max_bytes)
        tasks = {where: asyncio.ensure_future(self.fetch(url, where, budget)) for where, url in urls.items()}
        try:
            await asyncio.gather(*tasks.values())
            return {where: task.result() for where, task in tasks.items()}
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def fetch(self, url: str, where: str, budget: _Budget | None = None) -> bytes:
        """The bytes behind ``url``; a 4xx naming ``where`` for a URL that may not be fetched, cannot be, or whose
        body is too large."""
        budget = budget or _Budget(self.max_bytes)
        try:
            async with asyncio.timeout(self.timeout_s):
                for _ in range(self.max_redirects + 1):
                    target, host, name, address = await self._checked(url, where)
                    # A client per hop: a pooled connection to the same address would carry the next host's request
                    # under the TLS name checked for the last one.
                    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=self.timeout_s + 1
                                                 ) as http, http.stream(
                            "GET", target, headers={"host": host, "user-agent": "nextgpt-serve"},
                            extensions={"sni_hostname": name}) as response:
                        if response.status_code in _REDIRECTS and "location" in response.headers:
                            url = urljoin(url, response.headers["location"])
                            continue
                        if response.status_code != 200:
                            raise _failed(where, f"{address} answered {response.status_code}")
                        return await _body(response, where, budget)
                raise _failed(where, f"more than {self.max_redirects} redirects")
        except TimeoutError:
            raise _failed(where, f"no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise _failed(where, f"{type(exc).__name__}: {exc}") from exc

    async def _checked(self, url: str, where: str) -> tuple[str, str, str, str]:
        """``url`` with its host replaced by the address it was checked at; the Host header; the host name (TLS
        checks the certificate against it); the address."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequestError(f"{where}: only http(s) and base64 data URLs are taken", code="unsupported_url",
                                      param=where)
        if parts.username or parts.password:
            raise InvalidRequestError(f"{where}: URLs with credentials are not fetched", code="unsupported_url",
                                      param=where)
        literal = _ip(parts.hostname) is not None
        try:
            port = parts.port
            # An internationalised name travels as its ASCII (IDNA) form, in the lookup, Host and TLS alike.
            name = parts.hostname if literal else parts.hostname.encode("idna").decode("ascii")
        except (ValueError, UnicodeError) as exc:
            raise InvalidRequestError(f"{where}: not a usable URL ({exc})", code="unsupported_url",
                                      param=where) from exc
        try:
            addresses = [name] if literal else await self.resolver(
                name, port or (443 if parts.scheme == "https" else 80))
        except (OSError, ValueError) as exc:
            raise _failed(where, f"cannot resolve {name!r} ({exc})") from exc
        if not addresses:
            raise _failed(where, f"{name!r} has no address")
        refused = [a for a in addresses if not self._allowed(a)]
        if refused:
            raise InvalidRequestError(
                f"{where}: {name!r} is a private or reserved address ({refused[0]}); only public ones are "
                "fetched (NEXTGPT_GATEWAY__MEDIA_URL_PRIVATE)", code="media_url_not_allowed", param=where)
        address = addresses[0]
        at, named = (f"[{a}]" if ":" in a else a for a in (address, name))
        suffix = f":{port}" if port else ""
        target = urlunsplit((parts.scheme, at + suffix, parts.path or "/", parts.query, ""))
        return target, named + suffix, name, address

    def _allowed(self, address: str) -> bool:
        ip = _ip(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return self.allow_private or (ip is not None and ip.is_global)


class _Budget:
    """Bytes a request's fetched media may still take."""

    def __init__(self, total: int) -> None:
        self.total = self.left = total

    def take(self, size: int, where: str) -> None:
        self.left -= size
        if self.left < 0:
            raise PayloadTooLargeError(f"{where}: the media fetched for this request exceed {self.total} bytes",
                                       code="file_too_large", param=where)


async def _body(response: httpx.Response, where: str, budget: _Budget) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > budget.left:
        budget.take(int(declared), where)  # refused before any byte is read
    body = bytearray()
    async for chunk in response.aiter_bytes():
        budget.take(len(chunk), where)
        body += chunk
    return bytes(body)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` is (an IPv6 zone, "%eth0", aside), or None for a name."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _failed(where: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"{where}: could not fetch the URL: {why}", code="media_url_failed", param=where)
