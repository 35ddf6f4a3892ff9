"""`nextgpt eval world --url`: what a user gets, judged through the public API of a running stack (any mode).

Fresh world samples and held-out phrasings (no stage trained on either) go in as a user would send them:
uploaded PNG / MP4 / WAV files and plain words, never ``require_modalities`` (the model must pick the modality
from the words). Replies are judged by the world's measures: words of the text for descriptions, measured
classes of the downloaded artifacts for generations.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import soundfile
from PIL import Image

from services.decoders.media_out import mp4_bytes, png_bytes, wav_bytes
from services.training.world_tasks import (
    BOTH, CAN_MAKE, CREATE, DESCRIBE, NOTHING_SENT, RECOLOUR, SMALL_TALK, SYSTEM, TO_VIDEO, outside_request,
    typed,
)
from services.world.attributes import ATTRIBUTES, AUDIO_RATE, CLASSES, VIDEO_FPS, Attributes, WorldModality, caption
from services.world.measures import measure
from services.world.backgrounds import draw_background, transparent_picture
from services.world.render import RENDERERS, render, render_audio

API_EVAL_SEED = 2_000_003  # not a training seed, not the stand-ins' evaluation seed
MODALITIES = ("image", "video", "audio")
LONG_DRAWINGS = 6  # drawings in the long-conversation row; the last three are judged
BACKGROUND_KINDS = ("grey", "colour", "gradient")  # the describe-on-a-background rows take them in turn
PLAYED_SECONDS = (2.0, 8.0)  # the longer-tone row's lengths, drawn uniformly
MIME = {"image": ("world.png", "image/png"), "video": ("world.mp4", "video/mp4"), "audio": ("world.wav", "audio/wav")}


@dataclass
class Tally:
    scores: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def add(self, row: str, ok: bool) -> None:
        self.scores[row].append(int(ok))

    def table(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.scores.items() if v}


def media_file(modality: WorldModality, data: np.ndarray) -> bytes:
    if modality == "image":
        return png_bytes(Image.fromarray(data))
    if modality == "video":
        return mp4_bytes(data.astype(np.float32) / 255.0, VIDEO_FPS)
    return wav_bytes(data, AUDIO_RATE)


def decode_artifact(modality: str, payload: bytes) -> np.ndarray:
    if modality == "image":
        return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    if modality == "video":
        import av  # only video needs it (a machine without PyAV can still judge the other modalities)

        with av.open(io.BytesIO(payload)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    wave, _ = soundfile.read(io.BytesIO(payload), dtype="float32")
    return wave if wave.ndim == 1 else wave[:, 0]


def words_say(text: str, name: str, value: str) -> bool:
    """The reply names the right class of ``name`` and no other class of it."""
    words = set(text.lower().replace(".", " ").replace(",", " ").split())
    return value in words and not (words & (set(CLASSES[name]) - {value}))


# What a turn may take before its media wait starts (the upload, the encoder, the words): the client waits that
# much longer than the server holds the reply for its media, so that media that outlast the wait come back as a
# reply that says so ("media_pending", the jobs' states), never as a read timeout that says nothing.
TEXT_MARGIN_S = 120.0


class WorldClient:
    def __init__(self, url: str, api_key: str | None, wait_s: float = 300.0,
                 modalities: Collection[str] = MODALITIES) -> None:
        """``wait_s``: how long each reply is held for its media (the API's ``wait_s``)."""
        self.modalities = set(modalities)  # artifacts of other modalities are not downloaded or decoded
        self.wait_s = wait_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=wait_s + TEXT_MARGIN_S)

    def chat(self, text: str, media: tuple[WorldModality, np.ndarray] | None = None,
             conversation_id: str | None = None, seed: int = 0, **options: Any) -> dict[str, Any]:
        """``options``: more of the request's fields (``stop``, ``require_modalities``...)."""
        message: dict[str, Any] = {"role": "user", "content": text}
        request: dict[str, Any] = {"messages": [message], "max_tokens": 48, "inline_media": True,
                                   "wait_s": self.wait_s, "seed": seed, **options}
        if conversation_id:
            request["conversation_id"] = conversation_id
        if media is None:
            response = self.http.post("/v1/chat", json=request)
        else:
            name, mime = MIME[media[0]]
            message["files"] = [name]
            response = self.http.post("/v1/chat", data={"request": json.dumps(request)},
                                      files=[("files", (name, media_file(*media), mime))])
        response.raise_for_status()
        return response.json()

    def complete(self, text: str, system: str, seed: int = 0) -> dict[str, Any]:
        """``text`` after a ``system`` message through the OpenAI-compatible API: its words, and the modalities of
        the media it chose to make (``made``; still being made or failed too: the choice is the model's)."""
        request = {"model": "nextgpt", "max_tokens": 48, "seed": seed,
                   "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}]}
        response = self.http.post("/v1/chat/completions", json=request)
        response.raise_for_status()
        message = response.json()["choices"][0]["message"]
        made = [m for m, key in (("image", "images"), ("video", "videos"), ("audio", "audio")) if message.get(key)]
        made += [m["modality"] for key in ("media_pending", "media_errors") for m in message.get(key, [])]
        return {"text": message.get("content") or "", "made": made}

    def artifacts(self, reply: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
        out = []
        for artifact in reply["artifacts"]:
            if artifact.get("state") != "completed" or artifact["modality"] not in self.modalities:
                continue
            payload = base64.b64decode(artifact["data"]) if artifact.get("data") else \
                self.http.get(artifact["url"]).content
            out.append((artifact["modality"], decode_artifact(artifact["modality"], payload)))
        return out


def _first(artifacts: list[tuple[str, np.ndarray]], modality: str) -> np.ndarray | None:
    return next((data for m, data in artifacts if m == modality), None)


def _judge_words(row: Tally, modality: str, text: str, shown: Attributes) -> None:
    """One column per attribute of ``modality``: the reply's words name the one ``shown`` has."""
    for name in ATTRIBUTES[modality]:  # type: ignore[index]
        row.add(name, words_say(text, name, getattr(shown, name)))


def _judge_clip(row: Tally, clip: np.ndarray | None, still: Attributes, motion: str) -> None:
    """A clip asked to set the picture ``still`` in motion: made, in the picture's colour and shape, moving as
    asked."""
    got = _reading("video", clip)
    row.add("chose video", clip is not None)
    row.add("keeps colour", got.colour == still.colour)
    row.add("keeps shape", got.shape == still.shape)
    row.add("moves as asked", got.motion == motion)


def _unlike(rng: random.Random, earlier: Attributes) -> Attributes:
    """A picture that differs from ``earlier`` in colour and in shape."""
    return Attributes(size=rng.choice(CLASSES["size"]),
                      colour=rng.choice([c for c in CLASSES["colour"] if c != earlier.colour]),
                      shape=rng.choice([s for s in CLASSES["shape"] if s != earlier.shape]))


def _reading(modality: str, made: np.ndarray | None) -> Attributes:
    """What the measures read in an artifact; nothing (every attribute None, wrong against any ask) when none
    was made."""
    return measure(modality, made) if made is not None else Attributes()  # type: ignore[arg-type]


def check_modalities(modalities: Collection[str]) -> None:
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; choose from {list(MODALITIES)}")


def evaluate_api(client: WorldClient, count: int = 12, progress: Callable[[str], None] = lambda _: None,
                 seed: int = API_EVAL_SEED, modalities: Collection[str] = MODALITIES) -> dict[str, dict[str, float]]:
    """``modalities``: the rows to run are those whose inputs and outputs are all among these (a bundle or a
    machine without video, say). Every row draws its samples and phrasings whether it runs or not, so a row's
    items are the same in a partial run as in a full one."""
    check_modalities(modalities)

    def runs(*needed: str) -> bool:
        return set(needed) <= set(modalities)

    rng, rng_second, rng_about = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    rng_long, rng_behind, rng_plain = random.Random(seed + 3), random.Random(seed + 8), random.Random(seed + 11)
    rng_animate = random.Random(seed + 12)
    tallies: dict[str, Tally] = defaultdict(Tally)
    for i in range(count):
        for modality in ("image", "video", "audio"):
            sample = render(modality, seed, i)  # type: ignore[arg-type]
            describe = rng.choice(DESCRIBE["eval"][modality])
            if runs(modality):
                reply = client.chat(describe, (modality, sample.data))  # type: ignore[arg-type]
                _judge_words(tallies[f"describe {modality}"], modality, reply["text"], sample.attributes)
            asked = render(modality, seed + 1, i).attributes  # type: ignore[arg-type]
            create = rng.choice(CREATE["eval"][modality]).format(x=caption(modality, asked))  # type: ignore[arg-type]
            if runs(modality):
                made = _first(client.artifacts(client.chat(create)), modality)
                tallies[f"generate {modality}"].add("chose the modality", made is not None)
                got = _reading(modality, made)
                for name in ATTRIBUTES[modality]:  # type: ignore[index]
                    if name != "size":
                        tallies[f"generate {modality}"].add(name, getattr(got, name) == getattr(asked, name))
        for modality in ("image", "video"):
            # The same shapes on what a user's media have behind them (its own streams: the rows above keep theirs).
            shown = render(modality, seed + 8, i)  # type: ignore[arg-type]
            kind = BACKGROUND_KINDS[i % len(BACKGROUND_KINDS)]
            behind = draw_background(np.random.default_rng([seed + 8, i]), shown.attributes.colour, kind)
            question = rng_behind.choice(DESCRIBE["eval"][modality])
            if runs(modality):
                drawn = RENDERERS[modality](seed + 8, i, background=behind)
                reply = client.chat(question, (modality, drawn.data))  # type: ignore[arg-type]
                _judge_words(tallies[f"describe {modality} on a background"], modality, reply["text"],
                             shown.attributes)
        question = rng_behind.choice(DESCRIBE["eval"]["image"])
        if runs("image"):  # an RGBA PNG, which the encoder lays on white
            shown = render("image", seed + 9, i)
            reply = client.chat(question, ("image", transparent_picture(seed + 9, i)))
            _judge_words(tallies["describe a transparent picture"], "image", reply["text"], shown.attributes)
        shown = render("audio", seed + 10, i)
        seconds = rng_behind.uniform(*PLAYED_SECONDS)
        question = rng_behind.choice(DESCRIBE["eval"]["audio"])
        if runs("audio"):  # a tone played for longer than the world's 1 s, as a recording of one is
            played = render_audio(seed + 10, i, seconds=seconds).data
            reply = client.chat(question, ("audio", played))
            _judge_words(tallies["describe a longer tone"], "audio", reply["text"], shown.attributes)
        _ordinary_inputs(client, tallies, rng_plain, seed, i, runs)
        still = render("image", seed + 2, i)
        motion = rng.choice(CLASSES["motion"])
        animate = rng.choice(TO_VIDEO["eval"]).format(m=motion)
        if runs("image", "video"):
            clip = _first(client.artifacts(client.chat(animate, ("image", still.data))), "video")
            _judge_clip(tallies["image -> video"], clip, still.attributes, motion)
        picture, tone = render("image", seed + 3, i).attributes, render("audio", seed + 3, i).attributes
        both = rng.choice(BOTH["eval"]).format(x=caption("image", picture), y=caption("audio", tone))
        if runs("image", "audio"):
            made_all = client.artifacts(client.chat(both))
            image, sound = _first(made_all, "image"), _first(made_all, "audio")
            row = tallies["two media in one reply"]
            row.add("both made", image is not None and sound is not None)
            row.add("image colour", image is not None and measure("image", image).colour == picture.colour)
            row.add("audio pitch", sound is not None and measure("audio", sound).pitch == tone.pitch)
        first = render("image", seed + 4, i).attributes
        draw_first = rng.choice(CREATE["eval"]["image"]).format(x=caption("image", first))
        colour = rng.choice([c for c in CLASSES["colour"] if c != first.colour])
        recolour = rng.choice(RECOLOUR["eval"]).format(c=colour)
        if not runs("image"):  # the rows below are all about pictures (their other streams are theirs alone)
            progress(f"{i + 1}/{count}")
            continue
        reply = client.chat(draw_first)
        image = _first(client.artifacts(client.chat(recolour, conversation_id=reply["conversation_id"])), "image")
        got = _reading("image", image)
        row = tallies["follow-up changes one attribute"]
        row.add("new colour", got.colour == colour)
        row.add("keeps shape", got.shape == first.shape)
        # A second, unrelated drawing in the same conversation (its own random stream, so the rows above keep
        # their samples): it must show the new request, not the earlier picture again.
        earlier = render("image", seed + 5, i).attributes
        wanted = _unlike(rng_second, earlier)
        reply = client.chat(rng_second.choice(CREATE["eval"]["image"]).format(x=caption("image", earlier)))
        reply = client.chat(rng_second.choice(CREATE["eval"]["image"]).format(x=caption("image", wanted)),
                            conversation_id=reply["conversation_id"])
        image = _first(client.artifacts(reply), "image")
        got = _reading("image", image)
        row = tallies["a second drawing in a conversation"]
        row.add("new colour", got.colour == wanted.colour)
        row.add("new shape", got.shape == wanted.shape)
        # A question about the picture just made (its own stream too): answered in words, with nothing new made.
        drawn = render("image", seed + 6, i).attributes
        reply = client.chat(rng_about.choice(CREATE["eval"]["image"]).format(x=caption("image", drawn)))
        shown = _first(client.artifacts(reply), "image")
        reply = client.chat(rng_about.choice(DESCRIBE["eval"]["image"]), conversation_id=reply["conversation_id"])
        seen = _reading("image", shown)
        row = tallies["asked about the picture it made"]
        row.add("makes nothing new", not reply["artifacts"])
        row.add("names its colour", words_say(reply["text"], "colour", seen.colour))
        row.add("names its shape", words_say(reply["text"], "shape", seen.shape))
        # A long conversation of drawings (its own stream too), each unlike the one before: the late ones must still
        # show their own request, not an earlier picture.
        wanted = render("image", seed + 7, i).attributes
        reply = client.chat(rng_long.choice(CREATE["eval"]["image"]).format(x=caption("image", wanted)))
        for turn in range(2, LONG_DRAWINGS + 1):
            wanted = _unlike(rng_long, wanted)
            reply = client.chat(rng_long.choice(CREATE["eval"]["image"]).format(x=caption("image", wanted)),
                                conversation_id=reply["conversation_id"])
            if turn > LONG_DRAWINGS - 3:
                image = _first(client.artifacts(reply), "image")
                got = _reading("image", image)
                row = tallies[f"drawings {LONG_DRAWINGS - 2}-{LONG_DRAWINGS} of a conversation"]
                row.add("colour", got.colour == wanted.colour)
                row.add("shape", got.shape == wanted.shape)
        # The picture just made, set in motion (its own stream too): a clip of that shape in that colour.
        drawn = render("image", seed + 12, i).attributes
        motion = rng_animate.choice(CLASSES["motion"])
        draw_it = rng_animate.choice(CREATE["eval"]["image"]).format(x=caption("image", drawn))
        animate_it = rng_animate.choice(TO_VIDEO["eval"]).format(m=motion)
        if runs("image", "video"):
            reply = client.chat(draw_it)
            reply = client.chat(animate_it, conversation_id=reply["conversation_id"])
            _judge_clip(tallies["sets the picture it made in motion"], _first(client.artifacts(reply), "video"), drawn,
                        motion)
        progress(f"{i + 1}/{count}")
    return {task: tally.table() for task, tally in tallies.items()}


def _held_out_talk(rng: random.Random) -> tuple[str, str]:
    """A held-out small-talk phrasing of a kind drawn at random, and the reply its kind was trained to give."""
    phrasings, reply = SMALL_TALK[rng.choice(sorted(SMALL_TALK))]
    return rng.choice(phrasings["eval"]), reply


def _ordinary_inputs(client: WorldClient, tallies: dict[str, Tally], rng: random.Random, seed: int, i: int,
                     runs: Callable[..., bool]) -> None:
    """What people type that the world's phrasings are not: a request in lower case with no full stop, small
    talk (a greeting, thanks, a question about the assistant or beyond it), a thing the world does not hold, and a
    description asked for with no medium sent. Held-out phrasings and held-out outside words throughout."""
    # The modalities in turn (not drawn), so that a partial run (``modalities``) asks a known number of these.
    modality: WorldModality = MODALITIES[i % 3]  # type: ignore[assignment]
    asked = render(modality, seed + 11, i).attributes
    request = typed(rng.choice(CREATE["eval"][modality]).format(x=caption(modality, asked)))
    talk, expected = _held_out_talk(rng)
    outside_modality: WorldModality = MODALITIES[(i + 1) % 3]  # type: ignore[assignment]
    outside = rng.choice(CREATE["eval"][outside_modality]).format(x=outside_request(rng, "eval", outside_modality))
    if runs(modality):
        made = _first(client.artifacts(client.chat(request)), modality)
        row = tallies["a request as typed (lower case, no stop)"]
        row.add("chose the modality", made is not None)
        got = _reading(modality, made)
        row.add("as asked", all(getattr(got, n) == getattr(asked, n) for n in ATTRIBUTES[modality] if n != "size"))
    reply = client.chat(talk)
    row = tallies["small talk"]
    row.add("makes nothing", not reply["artifacts"])
    row.add("the reply for it", reply["text"].strip() == expected)
    if runs(outside_modality):
        reply = client.chat(outside)
        row = tallies["a thing outside the world"]
        row.add("makes nothing", not reply["artifacts"])
        row.add("says what it can make", reply["text"].strip() == CAN_MAKE)
    # A held-out describe phrasing with no medium sent: nothing to describe (drawn last, so the draws above keep
    # their samples).
    unsent_modality: WorldModality = MODALITIES[(i + 2) % 3]  # type: ignore[assignment]
    unsent = rng.choice(DESCRIBE["eval"][unsent_modality])
    if runs(unsent_modality):
        reply = client.chat(unsent)
        row = tallies["asked to describe, nothing sent"]
        row.add("makes nothing", not reply["artifacts"])
        row.add("asks which", reply["text"].strip() == NOTHING_SENT)
    # After a held-out system prompt, as OpenAI-compatible clients send one (the server folds it into the first
    # turn): a held-out create request of a modality in turn, and held-out small talk.
    system = rng.choice(SYSTEM["eval"])
    prompted_modality: WorldModality = MODALITIES[(i + 1) % 3]  # type: ignore[assignment]
    prompted = rng.choice(CREATE["eval"][prompted_modality]).format(
        x=caption(prompted_modality, render(prompted_modality, seed + 12, i).attributes))
    prompted_talk, prompted_expected = _held_out_talk(rng)
    row = tallies["after a system prompt (OpenAI API)"]
    if runs(prompted_modality):
        row.add("a request makes it", client.complete(prompted, system, seed=i)["made"] == [prompted_modality])
    reply = client.complete(prompted_talk, system, seed=i)
    row.add("small talk: its reply", not reply["made"] and reply["text"].strip() == prompted_expected)
