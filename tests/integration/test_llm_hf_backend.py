"""The transformers backend on the tiny bundle: signal groups, hidden states, cancellation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from services.bundle.loader import load_bundle
from services.contracts.llm import Done, GenerateParams, LLMEvent, SignalEvent, TextDelta, Turn
from services.llm.hf_backend import HFBackend
from services.llm.signals import Group, SignalController


@pytest.fixture(scope="module")
def backend(tiny_bundle_dir: Path) -> HFBackend:
    return HFBackend(load_bundle(tiny_bundle_dir))


def _run(backend: HFBackend, params: GenerateParams, media: np.ndarray | None = None,
         cancel: threading.Event | None = None) -> list[LLMEvent]:
    events: list[LLMEvent] = []
    backend.generate(params, media, events.append, cancel or threading.Event())
    return events


def _params(**kw: object) -> GenerateParams:
    return GenerateParams(turns=[Turn(role="user", text="show me a picture", media=[0])], seed=3, **kw)  # type: ignore[arg-type]


MEDIA = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)


def test_required_modalities_give_complete_groups(backend: HFBackend) -> None:
    events = _run(backend, _params(max_tokens=50, require_modalities=["image", "video", "audio"]), MEDIA)
    signals = [e for e in events if isinstance(e, SignalEvent)]
    assert sorted(s.modality for s in signals) == ["audio", "image", "video"]
    shapes = {s.modality: s.conditioning.shape for s in signals}
    assert shapes == {"image": (77, 32), "video": (77, 48), "audio": (24,)}
    done = events[-1]
    assert isinstance(done, Done) and done.completion_tokens <= 50
    ids = done.token_ids
    manifest = backend.manifest
    for modality, spec in manifest.outputs.items():
        group = spec.signal.token_ids
        start = ids.index(group[0])
        assert ids[start:start + len(group)] == group, f"partial {modality} group"
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert "[IMG" not in text and "[VID" not in text


def test_generation_states_equal_teacher_forced_prefill(backend: HFBackend) -> None:
    params = _params(max_tokens=30, require_modalities=["image"], temperature=0.7, top_p=0.9)
    events = _run(backend, params, MEDIA)
    signal = next(e for e in events if isinstance(e, SignalEvent))
    done = events[-1]
    assert isinstance(done, Done)
    embeds = backend.prompt_embeddings(params, MEDIA)
    states = backend.prefill_states(embeds, done.token_ids, backend.manifest.llm.default_lora)
    start = done.token_ids.index(backend.manifest.outputs["image"].signal.token_ids[0])
    prompt_len = embeds.shape[0]
    # Prefill row p is the state whose input is position p: generated token j sits at prompt_len + j.
    offset = backend.manifest.hidden_state_offset
    rows = states[prompt_len + start + offset: prompt_len + start + offset + 4]
    expected = backend.projectors.project("image", rows).numpy()
    assert np.allclose(signal.conditioning, expected, atol=1e-4)


def test_greedy_is_deterministic_and_lora_matters(backend: HFBackend) -> None:
    greedy = _params(max_tokens=12, temperature=0.0)
    a = _run(backend, greedy, MEDIA)[-1]
    b = _run(backend, greedy, MEDIA)[-1]
    assert isinstance(a, Done) and isinstance(b, Done)
    assert a.token_ids == b.token_ids
    embeds = backend.prompt_embeddings(greedy, MEDIA)
    adapted = backend.prefill_states(embeds, a.token_ids, "nextgpt")
    base = backend.prefill_states(embeds, a.token_ids, None)
    assert (adapted - base).abs().max() > 1e-3


def test_cancel_stops_generation(backend: HFBackend) -> None:
    cancel = threading.Event()
    events: list[LLMEvent] = []

    def emit(event: LLMEvent) -> None:
        events.append(event)
        if isinstance(event, TextDelta):
            cancel.set()

    backend.generate(_params(max_tokens=200), MEDIA, emit, cancel)
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "cancelled" and done.completion_tokens < 10


def test_bad_media_and_lora_are_client_errors(backend: HFBackend) -> None:
    from services.contracts.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="media vectors must be"):
        _run(backend, _params(), np.zeros((1, 7), np.float32))
    with pytest.raises(InvalidRequestError, match="reference media"):
        _run(backend, _params(), None)
    with pytest.raises(InvalidRequestError, match="unknown LoRA"):
        _run(backend, _params(lora="nope"), MEDIA)


def _run_group(ctl: SignalController, first: int, at: int) -> Group | None:
    """Feed a group the controller let start: its first token, then the tokens it forces."""
    group = ctl.observe(first, at)
    while group is None:
        forced = ctl.decide(100).forced
        assert forced is not None
        group = ctl.observe(forced, at)
    return group


def test_controller_masks_and_forces(backend: HFBackend) -> None:
    m = backend.manifest
    img, aud = m.outputs["image"].signal.token_ids, m.outputs["audio"].signal.token_ids
    stops = list(m.stop.token_ids)
    ctl = SignalController(m, ["image"], [], max_groups=1, stop_ids=stops)
    decision = ctl.decide(100)
    assert img[1] in decision.banned and img[0] not in decision.banned and decision.forced is None
    assert ctl.choose(img[0], 100) == img[0]
    assert ctl.observe(img[0], 5) is None
    for expected in img[1:]:
        assert ctl.decide(100).forced == expected
        group = ctl.observe(expected, 0)
    assert group == Group("image", 5, 0, forced=False, made=True)
    # A group the reply may not make is not masked: it runs unmade (nothing decoded), so the model goes on as it
    # would after it: here max_groups is used up, then audio is not allowed.
    assert img[0] not in ctl.decide(100).banned and ctl.choose(img[0], 100) == img[0]
    assert _run_group(ctl, img[0], 9) == Group("image", 9, 1, forced=False, made=False)
    assert ctl.choose(aud[0], 100) == aud[0]
    assert not _run_group(ctl, aud[0], 13).made  # type: ignore[union-attr]
    assert ctl.emitted == [Group("image", 5, 0, forced=False, made=True)]
    # A group that would not fit the budget ends the reply where it would start.
    fresh = SignalController(m, None, [], max_groups=4, stop_ids=stops)
    assert fresh.choose(aud[0], len(aud) - 1) is None and fresh.choose(aud[0], len(aud)) == aud[0]
    assert fresh.choose(stops[0], 100) == stops[0]
    owed = SignalController(m, None, ["audio"], max_groups=2, stop_ids=stops)
    assert owed.choose(stops[0], 100) == aud[0]
    assert owed.decide(len(aud)).forced == aud[0]


def test_model_started_group_cannot_starve_a_required_one(backend: HFBackend) -> None:
    m = backend.manifest
    vid, img = m.outputs["video"].signal.token_ids, m.outputs["image"].signal.token_ids
    stops = list(m.stop.token_ids)

    def ctl(max_groups: int = 4, allowed: list[str] | None = None) -> SignalController:
        return SignalController(m, allowed, ["image"], max_groups=max_groups, stop_ids=stops)  # type: ignore[arg-type]

    # No room for the video and the owed picture: the model's start becomes the picture's.
    assert ctl().choose(vid[0], len(vid) + len(img) - 1) == img[0]
    assert ctl().choose(vid[0], len(vid) + len(img)) == vid[0]
    assert ctl(max_groups=1).choose(vid[0], 1000) == img[0] and ctl(max_groups=1).choose(img[0], 1000) == img[0]
    assert ctl(allowed=["image"]).choose(vid[0], 1000) == img[0]  # a disallowed start while a group is owed


def _in_threads(backend: HFBackend, requests: list[tuple[GenerateParams, np.ndarray | None]],
                stagger_s: float = 0.0) -> list[list[LLMEvent]]:
    """Run requests concurrently (each in its own thread, as LLMService does), optionally joining one by one."""
    results: list[list[LLMEvent]] = [[] for _ in requests]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            backend.generate(requests[i][0], requests[i][1], results[i].append, threading.Event())
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
        time.sleep(stagger_s)
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def _signals(events: list[LLMEvent]) -> list[SignalEvent]:
    return [e for e in events if isinstance(e, SignalEvent)]


def test_a_reply_does_not_depend_on_what_else_is_in_the_batch(backend: HFBackend) -> None:
    """The same request alone and inside a batch of 8 (other lengths, adapters, sampling, joining mid-way):
    the same tokens under greedy, and under a seed; the same signal conditioning within float tolerance."""
    rng = np.random.default_rng(5)
    texts = ["show me a picture", "hi", "a long request " * 12, "make a sound and a video", "x", "draw", "play",
             "tell me about it please"]
    requests = []
    for i, text in enumerate(texts):
        params = GenerateParams(turns=[Turn(role="user", text=text, media=[0])], seed=i, max_tokens=8 + 5 * i,
                                temperature=0.0 if i % 2 == 0 else 0.9, top_p=0.9,
                                lora=None if i % 3 == 0 else "nextgpt",
                                require_modalities=[["image"], ["audio"], [], ["video", "image"]][i % 4])  # type: ignore[list-item]
        requests.append((params, rng.standard_normal((1, 128)).astype(np.float32)))
    alone = [_run(backend, params, media) for params, media in requests]
    for together in (_in_threads(backend, requests), _in_threads(backend, requests, stagger_s=0.01)):
        for solo, batched in zip(alone, together, strict=True):
            assert isinstance(solo[-1], Done) and isinstance(batched[-1], Done)
            assert batched[-1].token_ids == solo[-1].token_ids
            assert "".join(e.text for e in batched if isinstance(e, TextDelta)) == \
                "".join(e.text for e in solo if isinstance(e, TextDelta))
            assert [s.modality for s in _signals(batched)] == [s.modality for s in _signals(solo)]
            for a, b in zip(_signals(solo), _signals(batched), strict=True):
                assert np.allclose(a.conditioning, b.conditioning, atol=1e-4)


def test_a_cancelled_reply_leaves_the_batch_and_the_others_go_on(backend: HFBackend) -> None:
    cancel = threading.Event()
    events: list[LLMEvent] = []

    def cancelling(event: LLMEvent) -> None:
        events.append(event)
        if isinstance(event, TextDelta):
            cancel.set()

    others = [(_params(max_tokens=40, temperature=0.0), MEDIA)] * 3
    expected = _run(backend, *others[0])[-1]
    thread = threading.Thread(target=backend.generate, args=(_params(max_tokens=400), MEDIA, cancelling, cancel))
    thread.start()
    results = _in_threads(backend, others)
    thread.join(timeout=60)
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"
    assert all(isinstance(r[-1], Done) and r[-1].token_ids == expected.token_ids for r in results)  # type: ignore[union-attr]
    assert backend.engine.running == 0


def test_a_reply_that_fails_on_its_own_leaves_the_batch_and_the_others_go_on(backend: HFBackend) -> None:
    """A failure inside one reply's step (here its consumer refuses its first text) fails that reply only: the
    engine thread lives on, its batch-mates finish as they would alone, and the next request is served. (A bug of
    that kind on CUDA once stopped the engine thread, and every request after it waited forever.)"""

    class Gone(Exception):
        pass

    def refusing(event: LLMEvent) -> None:
        if isinstance(event, TextDelta):
            raise Gone("the reader went away")

    others = [(_params(max_tokens=40, temperature=0.0), MEDIA)] * 3
    expected = _run(backend, *others[0])[-1]
    failed: list[BaseException] = []

    def bad() -> None:
        try:
            backend.generate(_params(max_tokens=400, temperature=0.0), MEDIA, refusing, threading.Event())
        except Gone as exc:
            failed.append(exc)

    thread = threading.Thread(target=bad)
    thread.start()
    results = _in_threads(backend, others)
    thread.join(timeout=30)
    assert not thread.is_alive() and len(failed) == 1
    assert all(isinstance(r[-1], Done) and r[-1].token_ids == expected.token_ids for r in results)  # type: ignore[union-attr]
    again = _run(backend, *others[0])[-1]
    assert isinstance(again, Done) and again.token_ids == expected.token_ids  # type: ignore[union-attr]
    assert backend.engine.running == 0


def test_streamed_text_is_the_decoded_reply(backend: HFBackend) -> None:
    """Text goes out incrementally (a few tokens decoded per step), and adds up to the whole reply decoded once."""
    events = _run(backend, _params(max_tokens=60, temperature=1.2, top_p=1.0), MEDIA)
    done = events[-1]
    assert isinstance(done, Done)
    signal_ids = {i for spec in backend.manifest.outputs.values() for i in spec.signal.token_ids}
    stop = set(backend.manifest.stop.token_ids)
    text_ids = [t for t in done.token_ids if t not in signal_ids and t not in stop]
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 1
    assert "".join(deltas) == backend.tokenizer.decode(text_ids, skip_special_tokens=True)


def test_every_budget_keeps_required_groups_whole_or_is_refused(backend: HFBackend) -> None:
    from prometheus_client import CollectorRegistry

    from services.contracts.settings import LLMSettings
    from services.llm.metrics import LLMMetrics
    from services.llm.serving import LLMService
    from tests.support.budgets import budgets_around, check_budgets

    service = LLMService(backend, LLMSettings(), LLMMetrics(CollectorRegistry()), backend.manifest)
    assert check_budgets(service, backend.manifest, budgets_around(backend.manifest), MEDIA) > 50


def test_each_pass_gets_its_rows_adapter_whatever_ran_before(backend: HFBackend) -> None:
    """The engine keeps the LoRA layers as the last pass left them (switching per pass was half a decode step):
    a base-model pass after an adapter's, an adapter's after a base-model pass, and a mixed batch after either
    each get their own rows' adapter. PEFT's per-row path (a mixed batch) is the reference for both."""
    embeds = backend.prompt_embeddings(_params(), MEDIA)[None]

    def states(adapters: list[str | None]) -> torch.Tensor:
        with backend.engine.model_lock, torch.inference_mode():
            _, rows = backend.engine.forward(adapters, inputs_embeds=embeds.expand(len(adapters), -1, -1),
                                             logits_to_keep=1)
        return rows[:, -1]

    reference = states(["nextgpt", None])
    assert (reference[0] - reference[1]).abs().max() > 1e-3  # the adapter changes the states
    for lora in ["nextgpt", None, None, "nextgpt", "nextgpt", None]:
        assert torch.allclose(states([lora])[0], reference[0 if lora else 1], atol=1e-5), lora
        mixed = states([None, "nextgpt"])
        assert torch.allclose(mixed, reference.flip(0), atol=1e-5)
