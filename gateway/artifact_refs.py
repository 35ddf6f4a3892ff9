"""Media this server made, named by the artifact URLs it gave out. A stateless client (the OpenAI API keeps no
conversation) sends a reply back as history with its pictures as those URLs; taken back to their artifact keys,
they go through the encoder as a kept conversation's generated media do, so the model sees what it made.

Only URLs this server signed are taken, whatever their expiry: the signature shows the key came from here, and
the model's words about a picture reveal less than the picture itself, which the expiry protects."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote, urlsplit

from gateway.security import UrlSigner
from services.contracts.errors import InvalidRequestError
from services.contracts.storage import check_key

ARTIFACT_ROUTE = "/v1/artifacts/"
_EXPIRES = re.compile(r"[0-9]{1,18}")


def names_artifact(url: str) -> bool:
    """Whether ``url`` is shaped like one of this server's artifact URLs (behind any proxy prefix)."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and ARTIFACT_ROUTE in parts.path


class ArtifactRefs:
    def __init__(self, signer: UrlSigner) -> None:
        self.signer = signer

    def key(self, url: str) -> str | None:
        """The artifact key of a URL this server signed; None for any other."""
        if not names_artifact(url):
            return None
        parts = urlsplit(url)
        key = unquote(parts.path[parts.path.index(ARTIFACT_ROUTE) + len(ARTIFACT_ROUTE):])
        query = parse_qs(parts.query)
        expires, sig = query.get("expires", [""])[-1], query.get("sig", [""])[-1]
        # ASCII digits only (str.isdigit takes "²", which int() refuses), at most 18 of them, as the route takes
        if not _EXPIRES.fullmatch(expires) or not self.signer.issued(f"{ARTIFACT_ROUTE}{key}", int(expires), sig):
            return None
        try:
            return check_key(key)
        except InvalidRequestError:
            return None
