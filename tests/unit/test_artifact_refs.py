"""This server's artifact URLs read back to their keys (``ArtifactRefs``), and the bound on an answer's media
taken back from a stateless history."""

from __future__ import annotations

from gateway.artifact_refs import ArtifactRefs, names_artifact
from gateway.chat import _newest_fit
from gateway.security import UrlSigner
from services.contracts.chat import ChatMessage

KEY = "image/2026/12/05/0123456789abcdef0123456789abcdef.png"


def test_a_url_this_server_signed_gives_its_key_expired_or_not() -> None:
    signer = UrlSigner(b"k" * 32, ttl_s=60)
    refs = ArtifactRefs(signer)
    fresh = "http://127.0.0.1:8000" + signer.sign(f"/v1/artifacts/{KEY}")
    expired = "https://api.example.com/nextgpt" + signer.sign(f"/v1/artifacts/{KEY}", now=1_000_000)  # behind a prefix
    assert refs.key(fresh) == refs.key(expired) == KEY
    assert refs.key(fresh.replace("sig=", "sig=0")) is None  # not its signature
    assert ArtifactRefs(UrlSigner(b"j" * 32, ttl_s=60)).key(fresh) is None  # another signing key
    assert refs.key(fresh.split("?")[0]) is None  # unsigned
    assert refs.key(fresh.replace("expires=", "expires=1" * 30)) is None  # no number a signature could hold
    assert refs.key(fresh.replace("expires=", "expires=\u00b2")) is None  # a digit to str.isdigit, not to int()
    other = "http://127.0.0.1:8000" + signer.sign("/v1/artifacts/not-a-key")  # signed, but no artifact key
    assert refs.key(other) is None
    assert not names_artifact("data:image/png;base64,AAAA") and not names_artifact("ftp://x/v1/artifacts/" + KEY)


def test_an_answers_media_past_the_bound_are_left_out_oldest_first() -> None:
    messages = [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b"),
                ChatMessage(role="user", content="c"), ChatMessage(role="assistant", content="d"),
                ChatMessage(role="user", content="e")]
    made = [["u1"], ["a1", "a2"], [], ["a3", "a4"], ["u2"]]
    assert _newest_fit(made, messages, 3) == [["u1"], ["a2"], [], ["a3", "a4"], ["u2"]]  # the user's never cut
    assert _newest_fit(made, messages, 0) == [["u1"], [], [], [], ["u2"]]
    assert _newest_fit(made, messages, -2) == [["u1"], [], [], [], ["u2"]]
    assert _newest_fit(made, messages, 9) == made
