"""The stage-3 conversations: wrapped requests in training, held-out phrasings never trained on."""

from __future__ import annotations

import functools
import random

from services.training.world_tasks import (
    BOTH, CAN_MAKE, CREATE, DESCRIBE, NOTHING_SENT, OPEN_CREATE, OUTSIDE, RECOLOUR, SMALL_TALK, SYSTEM, SYSTEM_RATE,
    TO_IMAGE, TO_VIDEO, TYPED_BARE_RATE, TYPED_LOWER_RATE, WRAP_RATE, WRAPPERS, about_made_task, animate_made_task,
    another_request_task, describe_task, encoder_alignment, instruction, nothing_sent_task, outside_task, random_attrs,
    small_talk_task, training_phrasings, wrap, wrappable,
)
from services.world.attributes import ATTRIBUTES, CLASSES, Attributes, caption
from services.world.text import QUESTIONS

TABLES = {"describe": DESCRIBE, "create": CREATE, "open create": OPEN_CREATE, "to video": TO_VIDEO,
          "to image": TO_IMAGE, "recolour": RECOLOUR, "both": BOTH}
# The words that carry the eval phrasings' meaning: the model must understand them without having trained on them.
EVAL_ONLY_WORDS = {"contains", "render", "sketch", "synthesize", "set", "motion", "towards", "redo", "recording",
                   "choice"}

# The words that carry the held-out small talk's meaning.
TALK_EVAL_ONLY_WORDS = {"greetings", "afternoon", "talents", "abilities", "appreciated", "cheers", "football",
                        "summarize"}


def _sentences(options: list[str] | dict[str, list[str]]) -> list[str]:
    return [s for group in options.values() for s in group] if isinstance(options, dict) else list(options)


def _words(sentences: set[str]) -> set[str]:
    return {w.strip(".,?!:").lower() for s in sentences for w in s.split()}


def _without_system(text: str) -> str:
    return next((text[len(s) + 1:] for s in SYSTEM["train"] if text.startswith(f"{s} ")), text)


def _draw(modality: str) -> Attributes:
    return Attributes(**{name: CLASSES[name][0] for name in ATTRIBUTES[modality]})


def test_no_training_phrasing_wrapped_or_bare_is_an_eval_phrasing() -> None:
    bare = [s for table in TABLES.values() for s in _sentences(table["train"])]
    bare += [s for group in QUESTIONS.values() for s in group]
    trained = {form for s in bare for form in training_phrasings(s)}
    held_out = {s for table in TABLES.values() for s in _sentences(table["eval"])}
    assert len(trained) > 4 * len(bare)  # the wrappers multiply the phrasings
    assert not trained & held_out
    assert EVAL_ONLY_WORDS <= _words(held_out)
    assert not _words(trained) & EVAL_ONLY_WORDS


def test_a_phrasings_own_slot_is_not_a_wrappers() -> None:
    """RECOLOUR's ``{c}`` (the colour) inside a wrapper whose slot is also ``{c}``: the phrasing once, its slot
    kept for the colour; a phrasing that says please already is not wrapped."""
    for template in WRAPPERS:
        wrapped = wrap(template, "Now do it in {c}.").format(c="blue")
        assert wrapped.lower().count("do it") == 1 and "blue" in wrapped
    assert not wrappable("The same in {c}, please.")
    rng = random.Random(0)
    texts = [c.turns[-1].text for c in (instruction(rng, "train", _draw) for _ in range(3000))]
    assert not [t for t in texts if any(t.lower().count(w.lower()) > 1 for w in ("do it", "make it", "please"))]


def test_stage_three_wraps_about_half_its_requests_stage_one_and_eval_none() -> None:
    rng = random.Random(0)
    texts = [describe_task(rng, "train", _draw).turns[0].text for _ in range(2000)]
    plain = _sentences(DESCRIBE["train"])
    wrapped = [t for t in texts if t not in plain]
    share = sum(wrappable(s) for s in plain) / len(plain)
    assert abs(len(wrapped) / len(texts) - WRAP_RATE * share) < 0.05
    forms = {form for s in plain for form in training_phrasings(s)}
    assert set(wrapped) <= forms
    rng = random.Random(0)
    assert {describe_task(rng, "eval", _draw).turns[0].text for _ in range(200)} <= set(_sentences(DESCRIBE["eval"]))
    rng = random.Random(0)
    assert {encoder_alignment(rng, "train", _draw).turns[0].text for _ in range(200)} <= set(plain)


def test_a_new_request_is_answered_on_its_own_with_earlier_exchanges_as_history() -> None:
    rng = random.Random(0)
    drawn: list[tuple[str, Attributes]] = []

    def draw(modality: str) -> Attributes:
        attrs = Attributes(**{name: rng.choice(CLASSES[name]) for name in ATTRIBUTES[modality]})
        drawn.append((modality, attrs))
        return attrs

    made_before = 0
    exchanges: set[int] = set()
    for _ in range(300):
        drawn.clear()
        c = another_request_task(rng, "train", draw)
        *earlier, now = c.turns
        # Whole exchanges (a request, its reply) before the one new request.
        assert [t.role for t in earlier] == ["user", "assistant"] * (len(earlier) // 2) and now.role == "user"
        exchanges.add(len(earlier) // 2)
        # Every medium a turn refers to exists, in the order the turns show them, each used once.
        assert [i for t in c.turns for i in t.media] == list(range(len(c.inputs)))
        # What an earlier reply made comes back as an input medium of a drawn (existing) sample.
        for reply in earlier[1::2]:
            for i in reply.media:
                assert c.inputs[i] in drawn
                assert reply.text == f"Here is {caption(*c.inputs[i])}."
                made_before += 1
        # The reply names what its own signal groups make (the new request's).
        assert all(caption(m, a) in c.reply for m, a in c.outputs)
    assert exchanges == {1, 2, 3, 4, 5, 6}
    assert made_before > 50  # about a third of the first exchanges made something


def test_a_question_about_what_was_made_is_answered_from_it() -> None:
    rng = random.Random(1)
    draw = functools.partial(random_attrs, rng)
    kinds = set()
    for split in ("train", "eval"):
        for _ in range(200):
            c = about_made_task(rng, split, draw)  # type: ignore[arg-type]
            asked, made, question = c.turns
            ((modality, attrs),) = c.inputs
            # The earlier reply made the medium (drawn from the data: it comes back through the encoder); the
            # question has no medium of its own, and the reply makes nothing.
            assert (asked.media, made.media, question.media) == ([], [0], []) and c.outputs == []
            assert made.text == f"Here is {caption(modality, attrs)}." and question.role == "user"
            described = c.reply == f"{caption(modality, attrs).capitalize()}."
            kinds.add("described" if described else "answered")
            assert described or any(c.reply.endswith(f"{getattr(attrs, n)}.") for n in ATTRIBUTES[modality])
    assert kinds == {"described", "answered"}


def test_the_picture_it_made_is_set_in_motion_as_asked() -> None:
    rng = random.Random(2)
    draw = functools.partial(random_attrs, rng)
    motions = set()
    for split in ("train", "eval"):
        for _ in range(200):
            c = animate_made_task(rng, split, draw)  # type: ignore[arg-type]
            asked, made, follow_up = c.turns
            ((modality, still),) = c.inputs
            ((out, clip),) = c.outputs
            # The assistant's picture comes back as the input; the follow-up has no medium of its own and names the
            # motion in an animating phrasing of its split; the clip keeps the picture's size, colour and shape.
            assert modality == "image" and out == "video" and (asked.media, made.media, follow_up.media) == ([], [0], [])
            assert made.text == f"Here is {caption('image', still)}."
            assert (clip.size, clip.colour, clip.shape) == (still.size, still.colour, still.shape)
            assert clip.motion in follow_up.text and c.reply == f"Here is {caption('video', clip)}."
            phrasings = [p.format(m=clip.motion) for p in TO_VIDEO[split]]
            forms = {f for p in phrasings for f in training_phrasings(p)} if split == "train" else set(phrasings)
            assert follow_up.text in forms
            motions.add(clip.motion)
    assert motions == set(CLASSES["motion"])


def test_small_talk_and_things_outside_the_world_are_held_out_in_words_too() -> None:
    """Small talk and requests for what the world lacks: the eval phrasings and outside words appear in no
    training phrasing, the outside words name no class of the world, and each gets its one reply, making nothing."""
    trained_talk = {s for phrasings, _ in SMALL_TALK.values() for s in phrasings["train"]}
    held_talk = {s for phrasings, _ in SMALL_TALK.values() for s in phrasings["eval"]}
    bare = [s for table in TABLES.values() for s in _sentences(table["train"])] + sorted(trained_talk)
    trained = {form for s in bare for form in training_phrasings(s)}
    outside_trained = {w for words in OUTSIDE["train"].values() for w in words}
    outside_held = {w for words in OUTSIDE["eval"].values() for w in words}
    assert not held_talk & trained
    assert TALK_EVAL_ONLY_WORDS <= _words(held_talk)
    assert not TALK_EVAL_ONLY_WORDS & _words(trained)
    assert not (_words(outside_held) - {"a"}) & _words(trained | outside_trained)
    world = {w for name in ("colour", "shape", "size", "motion", "pitch", "rhythm") for w in CLASSES[name]}
    assert not _words(outside_trained | outside_held) & world
    rng = random.Random(0)
    for split in ("train", "eval"):
        talk = [small_talk_task(rng, split, _draw) for _ in range(200)]
        assert {c.reply for c in talk} == {reply for _, reply in SMALL_TALK.values()}
        assert all(not c.outputs and not c.inputs for c in talk)
        asked = [outside_task(rng, split, _draw) for _ in range(300)]
        assert {c.reply for c in asked} == {CAN_MAKE} and all(not c.outputs for c in asked)
        words = _words({c.turns[0].text for c in asked})
        assert words & _words(outside_held if split == "eval" else outside_trained)
        assert not words & (_words(outside_trained if split == "eval" else outside_held) - {"a"})


def test_a_medium_never_sent_is_asked_for_and_never_after_an_exchange() -> None:
    """"Describe this picture." with no medium gets NOTHING_SENT and makes nothing; it is never the second request
    of a conversation, where the earlier exchange's medium is there to describe."""
    rng = random.Random(0)
    for split in ("train", "eval"):
        asked = [nothing_sent_task(rng, split, _draw) for _ in range(300)]
        assert {c.reply for c in asked} == {NOTHING_SENT}
        assert all(not c.inputs and not c.outputs and len(c.turns) == 1 for c in asked)
        held = {s for s in _sentences(DESCRIBE["eval"])}
        assert ({c.turns[0].text for c in asked} & held) == (held if split == "eval" else set())
    later = [another_request_task(rng, "train", _draw) for _ in range(2000)]
    assert all(c.reply != NOTHING_SENT for c in later)
    mix = [instruction(rng, "train", _draw) for _ in range(3000)]
    assert 0 < sum(c.reply == NOTHING_SENT for c in mix) / len(mix) < 0.05


def test_stage_three_user_turns_come_as_typed_in_training_only() -> None:
    """In training a user turn may lose its final stop and start in lower case, at their rates; the replies and
    the held-out conversations stay as written."""
    rng = random.Random(0)
    train = [instruction(rng, "train", _draw) for _ in range(4000)]
    last = [_without_system(c.turns[-1].text) for c in train]
    assert abs(sum(not t.endswith((".", "?", "!")) for t in last) / len(last) - TYPED_BARE_RATE) < 0.03
    assert abs(sum(t[0].islower() for t in last) / len(last) - TYPED_LOWER_RATE) < 0.03
    assert all(t.text.endswith(".") for c in train for t in c.turns if t.role == "assistant")
    held = [instruction(rng, "eval", _draw) for _ in range(500)]
    assert all(t.text.endswith((".", "?", "!")) and t.text[0].isupper() for c in held for t in c.turns)


def test_a_system_prompt_comes_before_the_first_user_turn_in_training_only() -> None:
    """At its rate, a training conversation's first user turn starts with a training system prompt, as the server
    folds one in; the held-out ones are in no training conversation, and held-out conversations have none."""
    assert not set(SYSTEM["train"]) & set(SYSTEM["eval"])
    rng = random.Random(0)
    train = [instruction(rng, "train", _draw) for _ in range(4000)]
    assert all(c.turns[0].role == "user" for c in train)
    prompted = [c for c in train if c.turns[0].text.startswith(tuple(f"{s} " for s in SYSTEM["train"]))]
    assert abs(len(prompted) / len(train) - SYSTEM_RATE) < 0.03
    assert not any(s in t.text for c in train for t in c.turns for s in SYSTEM["eval"])
    assert all(s not in t.text for c in train for t in c.turns[1:] for s in SYSTEM["train"])
    held = [instruction(rng, "eval", _draw) for _ in range(500)]
    assert not any(s in t.text for c in held for t in c.turns for s in SYSTEM["train"] + SYSTEM["eval"])
