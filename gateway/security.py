"""API keys (kept only as hashes) and signed, expiring artifact URLs."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from pathlib import Path

from services.contracts.errors import AuthenticationError, ConfigurationError, PermissionDeniedError

log = logging.getLogger(__name__)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_key_file(path: Path) -> list[str]:
    """One key per line, blank lines and '#' comments skipped; a file that cannot be read or holds no key is a
    ConfigurationError (silently running without those keys, or without auth, would be worse)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigurationError(f"NEXTGPT_API_KEYS_FILE: cannot read {path}: {exc.strerror}",
                                 code="invalid_settings") from exc
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigurationError(f"NEXTGPT_API_KEYS_FILE: {path} holds no key", code="invalid_settings")
    return keys


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows the symlink a Kubernetes Secret volume swaps on update
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class ApiKeys:
    """``None`` keys and no file: authentication off (local development); the caller is then anonymous.

    ``key_file`` (NEXTGPT_API_KEYS_FILE) is read at once and again whenever it changes, looked at no more than
    every ``recheck_s``: a key removed from it (a rotated Kubernetes Secret, which the kubelet updates in place)
    stops working without a restart. A change that leaves it unreadable or empty keeps the keys it held (and is
    logged): a half-written file must not lock every client out, nor turn auth off."""

    def __init__(self, keys: list[str] | None, key_file: Path | None = None, recheck_s: float = 5.0) -> None:
        self._fixed = {key_hash(k) for k in keys or []}
        self._file, self.recheck_s = key_file, recheck_s
        self._stamp = _stamp(key_file) if key_file is not None else None
        self._from_file = {key_hash(k) for k in read_key_file(key_file)} if key_file is not None else set()
        self._next_check = time.monotonic() + recheck_s
        self._hashes: set[str] | None = (self._fixed | self._from_file) or None

    @property
    def enabled(self) -> bool:
        return self._hashes is not None

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._file is None or now < self._next_check:
            return
        self._next_check = now + self.recheck_s
        stamp = _stamp(self._file)
        if stamp == self._stamp:
            return
        try:
            keys = read_key_file(self._file)
        except ConfigurationError as exc:
            log.error("%s; keeping the %d keys it held", exc.message, len(self._from_file))
            return  # looked at again once it changes again
        finally:
            self._stamp = stamp
        self._from_file = {key_hash(k) for k in keys}
        self._hashes = self._fixed | self._from_file
        log.info("API keys reloaded from %s: %d keys", self._file, len(keys))

    def owner(self, authorization: str | None) -> str | None:
        """The caller's identity: a hash of its key (never the key itself)."""
        self._refresh()
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

    def issued(self, path: str, expires: int, sig: str) -> bool:
        """Whether this signer signed ``path`` with ``expires`` (expired or not)."""
        # compare_digest refuses non-ASCII str (a TypeError, i.e. a 500): compare bytes.
        return hmac.compare_digest(self._sig(path, expires).encode(), sig.encode("utf-8", "surrogateescape"))

    def verify(self, path: str, expires: int | None, sig: str | None, now: float | None = None) -> None:
        if expires is None or sig is None:
            raise PermissionDeniedError("artifact URL is not signed", code="unsigned_url")
        if not self.issued(path, expires, sig):
            raise PermissionDeniedError("artifact URL signature is invalid", code="bad_signature")
        if expires < (now or time.time()):
            raise PermissionDeniedError("artifact URL has expired", code="url_expired")
