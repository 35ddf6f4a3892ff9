"""API keys (kept only as hashes) and signed, expiring artifact URLs."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from services.contracts.errors import AuthenticationError, PermissionDeniedError


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """``None`` keys: authentication off (local development); the caller is then anonymous."""

    def __init__(self, keys: list[str] | None) -> None:
        self._hashes = {key_hash(k) for k in keys} if keys else None

    @property
    def enabled(self) -> bool:
        return self._hashes is not None

    def owner(self, authorization: str | None) -> str | None:
        """The caller's identity: a hash of its key (never the key itself)."""
        if self._hashes is None:
            return None
        # The scheme is case-insensitive (RFC 9110 11.1): "bearer KEY" is as good as "Bearer KEY".
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthenticationError("missing 'Authorization: Bearer <key>' header", code="missing_api_key")
        digest = key_hash(credentials.strip())
        if not any(hmac.compare_digest(digest, h) for h in self._hashes):
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        return digest[:32]


class UrlSigner:
    def __init__(self, key: bytes | None, ttl_s: int) -> None:
        self.key = key or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _sig(self, path: str, expires: int) -> str:
        return hmac.new(self.key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, path: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.ttl_s)
        return f"{path}?expires={expires}&sig={self._sig(path, expires)}"

    def verify(self, path: str, expires: int | None, sig: str | None, now: float | None = None) -> None:
        if expires is None or sig is None:
            raise PermissionDeniedError("artifact URL is not signed", code="unsigned_url")
        # compare_digest refuses non-ASCII str (a TypeError, i.e. a 500): compare bytes.
        if not hmac.compare_digest(self._sig(path, expires).encode(), sig.encode("utf-8", "surrogateescape")):
            raise PermissionDeniedError("artifact URL signature is invalid", code="bad_signature")
        if expires < (now or time.time()):
            raise PermissionDeniedError("artifact URL has expired", code="url_expired")
