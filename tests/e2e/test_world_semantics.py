"""Meaning, end to end, on the committed world bundle: what a user asks for is what comes back.

Through the public API of the embedded stack and of the distributed one (processes, Redis, S3, a Celery worker):
"draw a blue triangle" returns a blue triangle, a high beeping tone is high and beeping, a picture the model
chose itself shows the colour its reply names, and "what is in this picture?" about a red circle names a red
circle. (Animating a picture is not reliable yet with this bundle: see `nextgpt eval world`.) These
pass only when every piece of wiring is right: the encoder's preprocessing and projection, the prompt layout, the
LLM's hidden states at the bundle's offset, the projectors and their signal rows, the decoders' conditioning and
guidance. No ``require_modalities``: the model picks the modality from the words.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.bundle.loader import load_bundle
from services.cli.compose import embedded_app
from services.contracts.settings import Settings
from services.world.api_eval import WorldClient, words_say
from services.world.attributes import CLASSES, Attributes
from services.world.measures import measure
from services.world.render import render
from tests.support.servers import RedisInfo, S3Info, UvicornThread
from tests.support.stack import KEY, distributed_stack

WORLD_BUNDLE = Path(__file__).parents[2] / "bundles" / "nextgpt-world"


# Each check asks with several seeds (a seeded turn is reproducible, its media included) and needs most of them
# right: the bundle is a small model, right about 85-95% of the time on these attributes, and a different CPU's
# rounding may tip a borderline sample. A wiring mistake drops an attribute to chance (25% for colour, 50% for
# pitch), which 5 of 8 catches almost surely. Triangles are drawn reliably; squares still come out round (the
# world eval's shape row), so the drawing check asks for a triangle.
SEEDS = range(8)
NEEDED = 5


def _most(results: list[tuple[str, object]]) -> None:
    right = sum(1 for ok, _ in results if ok)
    assert right >= NEEDED, f"{right}/{len(results)} right: {results}"


def check_draw(client: WorldClient) -> None:
    results = []
    for seed in SEEDS:
        reply = client.chat("Draw a blue triangle.", seed=seed)
        made = [data for modality, data in client.artifacts(reply) if modality == "image"]
        got = measure("image", made[0]) if made else None
        ok = got is not None and (got.colour, got.shape) == ("blue", "triangle") \
            and words_say(reply["text"], "colour", "blue") and words_say(reply["text"], "shape", "triangle")
        results.append((ok, (reply["text"], got)))
    _most(results)


def check_tone(client: WorldClient) -> None:
    results = []
    for seed in SEEDS:
        reply = client.chat("Play a high beeping tone.", seed=seed)
        sounds = [data for modality, data in client.artifacts(reply) if modality == "audio"]
        got = measure("audio", sounds[0]) if sounds else None
        results.append((got is not None and (got.pitch, got.rhythm) == ("high", "beeping"), (reply["text"], got)))
    _most(results)


def check_picture_shows_what_the_reply_says(client: WorldClient) -> None:
    """Whatever the model chose to draw, the picture must be what its words say: the signal tokens' hidden states,
    the projector and the decoder's conditioning and guidance carry the meaning through."""
    results = []
    for seed in SEEDS:
        reply = client.chat("Draw a picture.", seed=seed)
        made = [data for modality, data in client.artifacts(reply) if modality == "image"]
        said = [c for c in CLASSES["colour"] if words_say(reply["text"], "colour", c)]
        got = measure("image", made[0]) if made else None
        results.append((got is not None and said == [got.colour], (reply["text"], got)))
    _most(results)


def check_describe(client: WorldClient) -> None:
    """An uploaded picture goes through the encoder's preprocessing, ImageBind's token features and the input
    projection into the prompt: the words that come back must be the picture's."""
    results = []
    for seed in SEEDS:
        picture = render("image", 4242, seed, Attributes(size="big", colour="red", shape="circle"))
        reply = client.chat("What is in this picture?", ("image", picture.data), seed=seed)
        ok = words_say(reply["text"], "colour", "red") and words_say(reply["text"], "shape", "circle")
        results.append((ok, reply["text"]))
    _most(results)


CHECKS = [check_draw, check_tone, check_picture_shows_what_the_reply_says, check_describe]


@pytest.fixture(scope="module")
def embedded_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(cache_dir=tmp_path_factory.mktemp("cache"), api_keys=KEY)
    with UvicornThread(embedded_app(settings, load_bundle(WORLD_BUNDLE))) as server:
        yield server.url


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_embedded_stack_answers_with_meaning(embedded_url: str, check) -> None:  # noqa: ANN001
    check(WorldClient(embedded_url, KEY))


def test_distributed_stack_answers_with_meaning(redis_info: RedisInfo, s3_info: S3Info, tmp_path: Path) -> None:
    prefix = f"{redis_info.key_prefix}world-{uuid.uuid4().hex[:8]}:"
    with distributed_stack(redis_info.url, prefix, s3_info, WORLD_BUNDLE, tmp_path) as stack:
        client = WorldClient(stack.url, KEY)
        for check in CHECKS:
            check(client)
