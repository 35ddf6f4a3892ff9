"""The world's training conversations for the three stages, in many phrasings per task.

Each task has training phrasings and a disjoint set of held-out phrasings (``split="eval"``) that no stage
trains on, so an evaluation can ask in words the model has not seen.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from services.contracts.chat import with_system
from services.contracts.llm import Turn
from services.world.attributes import ATTRIBUTES, CLASSES, Attributes, WorldModality, caption
from services.world.text import ANSWERS, QUESTIONS

Split = Literal["train", "eval"]
# Draws the classes of an input medium the data has (so a sample of them exists to show the model).
Draw = Callable[[WorldModality], Attributes]

DESCRIBE = {
    "train": {
        "image": ["Describe this picture.", "What is in this image?", "What do you see?", "Tell me what this shows.",
                  "Caption this picture.", "What is this?", "Explain the image.", "Give a caption for this.",
                  "What is in this picture?", "What does this picture show?", "What is shown here?",
                  "Describe it."],
        "video": ["Describe this clip.", "What happens in this video?", "What do you see in the clip?",
                  "Caption this video.", "Tell me what this video shows.", "What is moving here?",
                  "What is in this video?", "What does this clip show?", "Describe it."],
        "audio": ["Describe this sound.", "What do you hear?", "What is this audio?", "Caption this sound.",
                  "Tell me about this tone.", "What does this sound like?", "What is in this sound?",
                  "What does this audio play?", "Describe it."],
    },
    "eval": {
        "image": ["Can you tell me what this picture contains?", "Please describe the image for me."],
        "video": ["Can you tell me what this clip contains?", "Please describe the video for me."],
        "audio": ["Can you tell me what this recording contains?", "Please describe the sound for me."],
    },
}
CREATE = {
    "train": {
        "image": ["Draw {x}.", "Make a picture of {x}.", "Show me {x}.", "Generate an image of {x}.",
                  "Paint {x}.", "I want a picture of {x}.", "Create an image with {x}."],
        "video": ["Make a video of {x}.", "Film {x}.", "Show me a clip of {x}.", "Generate a video of {x}.",
                  "Animate {x}.", "I want a clip of {x}."],
        "audio": ["Play {x}.", "Make a sound: {x}.", "Generate audio of {x}.", "Let me hear {x}.",
                  "Produce {x}.", "I want to hear {x}."],
    },
    "eval": {
        "image": ["Could you please render {x} for me?", "Please sketch {x}."],
        "video": ["Could you please produce a moving clip of {x}?", "Please record a video of {x}."],
        "audio": ["Could you please synthesize {x}?", "Please sound {x}."],
    },
}
# Asking for a modality without saying what: the model picks the classes (and says which in its reply).
OPEN_CREATE = {
    "train": {
        "image": ["Draw a picture.", "Draw something.", "Make an image.", "Show me a picture.", "Paint anything."],
        "video": ["Make a video.", "Film something.", "Show me a clip.", "Animate something."],
        "audio": ["Play a sound.", "Play a tone.", "Let me hear something.", "Make a noise."],
    },
    "eval": {
        "image": ["Could you produce an image of your choice?"],
        "video": ["Could you produce a clip of your choice?"],
        "audio": ["Could you produce a sound of your choice?"],
    },
}
# Animating a picture in many verbs: with four phrasings that all said "move"/"moving", a request in other words
# ("could you set this in motion towards the left?") read as a question about the picture (a clip 21% of the time).
TO_VIDEO = {"train": ["Make this move {m}.", "Animate this moving {m}.", "Turn this into a video moving {m}.",
                      "Now make it move {m}.", "Move this to the {m}.", "Make it go {m}.", "Have this travel {m}.",
                      "Let this slide {m}.", "Make a clip of this going {m}.", "Send this {m} in a video.",
                      "Push it to the {m}."],
            "eval": ["Could you set this in motion towards the {m}?"]}
TO_IMAGE = {"train": ["Show this as a still picture.", "Make a picture of this.", "Draw a frame of this clip."],
            "eval": ["Could you give me a still image of this?"]}
# A follow-up names the change and points back ("it", "that one", "the same"); a second request names all it wants
# (another_request_task). With four follow-up phrasings, training on second requests made "could you redo it in
# blue?" read as a new request (keeps the shape 92% -> 29%): more ways of pointing back.
RECOLOUR = {"train": ["Now make it {c}.", "Make it {c} instead.", "Change the colour to {c}.", "Same, but {c}.",
                      "Try it in {c}.", "Now do it in {c}.", "Make that one {c}.", "The same in {c}, please.",
                      "I want it {c}.", "Paint it {c} now."],
            "eval": ["Could you redo it in {c}?"]}
# Two media asked for at once, in many verbs: with seven phrasings (weight 0.7), the mix with small talk and things
# outside the world made "could you render X and also synthesize Y?" (two verbs no phrasing has) a request for Y
# alone 13 times in 48 (the picture left out).
BOTH = {"train": ["Draw {x} and play {y}.", "Show me {x} and let me hear {y}.",
                  "Make a picture of {x} and a sound of {y}.", "Paint {x} and produce {y}.",
                  "I want a picture of {x} and a sound of {y}.", "Make an image of {x}, then play {y}.",
                  "Show {x} and make a sound: {y}.",
                  "Create {x} and generate {y}.", "Give me {x} together with {y}.", "I need {x}, plus {y}.",
                  "Generate an image of {x} and audio of {y}.", "Draw {x}; next, play {y}.",
                  "Make {x} and {y}.", "Paint {x} as well as {y}."],
        "eval": ["Could you render {x} and also synthesize {y}?"]}

# What the world holds, said to anything outside it (a question beyond it, a thing it cannot make).
CAN_MAKE = ("I make pictures and clips of a red, green, blue or yellow circle, square or triangle, and a high or "
            "low tone.")
# What people say that asks for nothing in the world: a greeting, thanks, a question about the assistant, one
# beyond it. Each kind has one reply, in words the world's tokenizer holds whole (replies spelt letter by letter,
# "only" or "draw", came out garbled after 1500 steps). Trained on the world's requests alone, the model answered
# "hello" with "H You are you beeping tone." and "What can you do?" the same (probed through the API).
SMALL_TALK: dict[str, tuple[dict[str, list[str]], str]] = {
    # The greeting and "about" replies are the language model's own from its pretraining text (world/text.py).
    "greeting": ({"train": ["Hello!", "Hello.", "Hi!", "Hi.", "Hi there!", "Hey!", "Hey there.", "Good morning!",
                            "Good evening.", "Hello there.", "Hiya!", "Yo!",
                            "Good day.", "Howdy!", "Hello, assistant!", "Hi, assistant.", "Morning!",
                            "Hey, hello!", "Salutations!"],
                  "eval": ["Greetings!", "Good afternoon."]},
                 "Hello! I can look at pictures, clips and sounds, and make them."),
    "about": ({"train": ["What can you do?", "Who are you?", "What are you?", "Help.", "Help me.", "What do you do?",
                         "Tell me about yourself.", "How does this work?", "What can I ask you?", "What do you make?",
                         "How can you help?", "What are your skills?", "What are you good at?", "Describe yourself.",
                         "Explain what you do.", "What are you able to do?", "What is your job?",
                         "Introduce yourself.", "What kind of assistant are you?"],
               "eval": ["Which talents do you have?", "Explain your abilities."]},
              "I am an assistant that sees pictures, watches clips, hears sounds and makes them."),
    "thanks": ({"train": ["Thank you.", "Thank you!", "Thanks!", "Thanks.", "Thanks a lot.", "Great, thanks.",
                          "Nice, thank you.", "Cool, thanks!", "Perfect, thanks.", "Many thanks.", "Thanks so much!",
                          "Much obliged.", "Wonderful, thank you.", "That is great, thanks.", "Ta!", "Thx."],
                "eval": ["Much appreciated.", "Cheers!"]},
               "You are welcome."),
    "beyond": ({"train": ["What is 2+2?", "Tell me a joke.", "What time is it?", "What is the capital of France?",
                          "Write a poem.", "How are you?", "Tell me a story.", "What is the weather like?",
                          "Translate this into French.", "Who is the president?", "Write some code.",
                          "What day is it today?", "What is the meaning of life?", "Can you book a flight?",
                          "Who wrote Hamlet?", "Give me some advice.", "What is your favourite food?",
                          "How tall is Mount Everest?"],
                "eval": ["Who won the football match?", "Summarize the news for me."]},
               CAN_MAKE),
}
# Asked to describe or about a medium when none was sent and nothing was made before: the model asks which one and
# says what it takes. Before, "describe it" with no medium got the greeting. Whole-word tokens, as SMALL_TALK's.
NOTHING_SENT = "What picture, clip or tone? I can look at pictures, clips and sounds."
# Things outside the world, asked for in the create phrasings ("Draw a purple circle.", "Play a song."): the model
# says what it can make (CAN_MAKE) and makes nothing. Before, "Draw a purple hexagon." drew a big green triangle,
# "Play some music." a big green circle, and "draw a cat" got words with nothing made.
OUTSIDE = {
    "train": {"colour": ["purple", "orange", "pink", "black", "white", "brown"],
              "shape": ["star", "heart", "hexagon", "oval", "rectangle", "cross"],
              "thing": ["a cat", "a dog", "a house", "a tree", "a car", "a person", "a flower", "a bird", "a face"],
              "sound": ["music", "a song", "a dog barking", "a piano", "rain", "a voice", "a drum", "birds singing"]},
    "eval": {"colour": ["violet", "cyan"], "shape": ["pentagon", "diamond"], "thing": ["a horse", "a castle"],
             "sound": ["a guitar", "thunder"]},
}
# How people type: often without the full stop, often in lower case. Trained on written sentences only, the model
# answered "Draw a blue square" (no full stop) with "H You are is Human is a small blue square." and drew nothing.
TYPED_BARE_RATE = 0.3  # a user turn's final . ! ? left off
TYPED_LOWER_RATE = 0.25  # its first letter in lower case


# How people wrap a request: politeness and indirection around the same core. Stage 3 asks half its training
# requests inside one of these, so that "Could you ..." or "..., please" does not change the task (the world's
# language model, trained on bare questions, reads "Can you tell me what this contains?" as an attribute
# question). The eval phrasings stay unseen as whole sentences, and their content words (contains, render,
# sketch, synthesize, set in motion, redo, recording) appear in no training phrasing: a test checks both.
WRAPPERS = ("Please {c}.", "Can you {c}?", "Could you {c}?", "Could you please {c}?", "Would you {c}?",
            "{C}, please.", "I would like you to {c}.", "Kindly {c}.", "{C} for me.", "Can you please {c} for me?")
WRAP_RATE = 0.5


def wrappable(sentence: str) -> bool:
    """An imperative the wrappers read well around (not a question, a first-person wish, a fragment or a request
    that says please already)."""
    return sentence.endswith(".") and ":" not in sentence and sentence.split()[0] not in {"I", "Same,", "The"} \
        and "please" not in sentence.lower()


def wrap(template: str, sentence: str) -> str:
    """``sentence`` inside ``template``, in one pass: a phrasing's own ``{c}`` (RECOLOUR's colour) is not a
    wrapper's slot. (Replaced one slot after the other, "Now do it in {c}." inside "{C}, please." became "Now do it
    in now do it in {c}, please." in training.)"""
    core = sentence[:-1]
    lower = core[0].lower() + core[1:]
    return re.sub(r"\{[Cc]\}", lambda slot: core if slot.group() == "{C}" else lower, template)


def training_phrasings(sentence: str) -> list[str]:
    """Every form a training phrasing can take in stage 3: bare, or inside each wrapper."""
    return [sentence] + ([wrap(t, sentence) for t in WRAPPERS] if wrappable(sentence) else [])


def _phrase(rng: random.Random, table: dict[str, list[str]] | dict[str, dict[str, list[str]]], split: Split,
            modality: str | None = None, wrapped: bool = False) -> str:
    options = table[split]
    sentence: str = rng.choice(options[modality] if modality else options)  # type: ignore[index]
    return _maybe_wrap(rng, sentence) if wrapped and split == "train" else sentence


def _maybe_wrap(rng: random.Random, sentence: str) -> str:
    if wrappable(sentence) and rng.random() < WRAP_RATE:
        return wrap(rng.choice(WRAPPERS), sentence)
    return sentence


def described(modality: WorldModality, attrs: Attributes) -> str:
    return caption(modality, attrs).capitalize() + "."


def partial_request(rng: random.Random, modality: WorldModality, attrs: Attributes) -> str:
    """How a user names what they want: sometimes leaving out the size or the rhythm (the model then picks)."""
    text = caption(modality, attrs)
    if modality != "audio" and rng.random() < 0.3:
        text = text.replace(f" {attrs.size} ", " ", 1)
    return text


@dataclass(frozen=True)
class Conversation:
    """A conversation before media and targets are attached: media as (modality, attributes) to be drawn."""

    turns: list[Turn]
    inputs: list[tuple[WorldModality, Attributes]]  # the media the turns refer to, by index
    reply: str
    outputs: list[tuple[WorldModality, Attributes]]  # the groups of the reply, with what each should show


def random_attrs(rng: random.Random, modality: WorldModality) -> Attributes:
    return Attributes(**{name: rng.choice(CLASSES[name]) for name in ATTRIBUTES[modality]})


def describe_task(rng: random.Random, split: Split, draw: Draw, wrapped: bool = True) -> Conversation:
    modality: WorldModality = rng.choice(["image", "video", "audio"])
    attrs = draw(modality)
    turn = Turn(role="user", text=_phrase(rng, DESCRIBE, split, modality, wrapped), media=[0])
    return Conversation([turn], [(modality, attrs)], described(modality, attrs), [])


def create_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    modality: WorldModality = rng.choice(["image", "video", "audio"])
    return _create(rng, split, modality, random_attrs(rng, modality))


def _create(rng: random.Random, split: Split, modality: WorldModality, attrs: Attributes) -> Conversation:
    text = _phrase(rng, CREATE, split, modality, wrapped=True).format(x=partial_request(rng, modality, attrs))
    return Conversation([Turn(role="user", text=text)], [], f"Here is {caption(modality, attrs)}.", [(modality, attrs)])


def open_create_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    modality: WorldModality = rng.choice(["image", "video", "audio"])
    attrs = random_attrs(rng, modality)
    text = _phrase(rng, OPEN_CREATE, split, modality, wrapped=True)
    return Conversation([Turn(role="user", text=text)], [], f"Here is {caption(modality, attrs)}.", [(modality, attrs)])


def _animated(rng: random.Random, split: Split, still: Attributes) -> tuple[str, Attributes]:
    """A request to set the picture ``still`` in motion, and the clip it asks for (its size, colour and shape)."""
    motion = rng.choice(CLASSES["motion"])
    clip = Attributes(size=still.size, colour=still.colour, shape=still.shape, motion=motion)
    return _phrase(rng, TO_VIDEO, split, wrapped=True).format(m=motion), clip


def image_to_video_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    still = draw("image")
    text, clip = _animated(rng, split, still)
    turn = Turn(role="user", text=text, media=[0])
    return Conversation([turn], [("image", still)], f"Here is {caption('video', clip)}.", [("video", clip)])


def video_to_image_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    clip = draw("video")
    still = Attributes(size=clip.size, colour=clip.colour, shape=clip.shape)
    turn = Turn(role="user", text=_phrase(rng, TO_IMAGE, split, wrapped=True), media=[0])
    return Conversation([turn], [("video", clip)], f"Here is {caption('image', still)}.", [("image", still)])


def two_media_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    picture, tone = random_attrs(rng, "image"), random_attrs(rng, "audio")
    text = _phrase(rng, BOTH, split, wrapped=True).format(x=caption("image", picture), y=caption("audio", tone))
    reply = f"Here is {caption('image', picture)} and {caption('audio', tone)}."
    return Conversation([Turn(role="user", text=text)], [], reply, [("image", picture), ("audio", tone)])


def follow_up_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    first = draw("image")
    colour = rng.choice([c for c in CLASSES["colour"] if c != first.colour])
    second = Attributes(size=first.size, colour=colour, shape=first.shape)
    turns = [
        Turn(role="user", text=_phrase(rng, CREATE, split, "image", wrapped=True).format(x=caption("image", first))),
        Turn(role="assistant", text=f"Here is {caption('image', first)}.", media=[0]),
        Turn(role="user", text=_phrase(rng, RECOLOUR, split, wrapped=True).format(c=colour)),
    ]
    return Conversation(turns, [("image", first)], f"Here is {caption('image', second)}.", [("image", second)])


# What an attribute question calls the medium it is about.
THING: dict[WorldModality, str] = {"image": "this picture", "video": "the thing in this clip", "audio": "this tone"}


def question_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    modality: WorldModality = rng.choice(["image", "video", "audio"])
    attrs = draw(modality)
    name = rng.choice(ATTRIBUTES[modality])
    turn = Turn(role="user", text=_attribute_question(rng, split, name, THING[modality]), media=[0])
    return Conversation([turn], [(modality, attrs)], ANSWERS[name].format(value=getattr(attrs, name)), [])


def _attribute_question(rng: random.Random, split: Split, name: str, thing: str) -> str:
    """A question about one attribute of ``thing``. Wrapped too in training ("Can you tell me the colour of this
    picture?"): the attribute named, not the wrapper, makes it a question about one attribute."""
    question = rng.choice(QUESTIONS[name]).format(thing=thing)
    question = question[0].upper() + question[1:]
    return _maybe_wrap(rng, question) if split == "train" else question


def small_talk_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    phrasings, reply = SMALL_TALK[rng.choice(sorted(SMALL_TALK))]
    return Conversation([Turn(role="user", text=rng.choice(phrasings[split]))], [], reply, [])


def nothing_sent_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    """A description or an attribute asked for with no medium in the conversation."""
    modality: WorldModality = rng.choice(["image", "video", "audio"])
    if rng.random() < 0.7:
        text = _phrase(rng, DESCRIBE, split, modality, wrapped=True)
    else:
        name = rng.choice(ATTRIBUTES[modality])
        text = _attribute_question(rng, split, name, THING[modality])
    return Conversation([Turn(role="user", text=text)], [], NOTHING_SENT, [])


def outside_request(rng: random.Random, split: Split, modality: WorldModality) -> str:
    """What a user may ask a modality for that the world does not hold: an unknown colour or shape of a known
    kind ("a purple circle", "a big red star moving up"), some other thing ("a cat"), a sound other than a tone."""
    words = OUTSIDE[split]
    if modality == "audio":
        return rng.choice(words["sound"])
    kind = rng.choice(["colour", "shape", "thing"])
    if kind == "thing":
        return rng.choice(words["thing"])
    colour = rng.choice(words["colour"]) if kind == "colour" else rng.choice(CLASSES["colour"])
    shape = rng.choice(words["shape"]) if kind == "shape" else rng.choice(CLASSES["shape"])
    size = f"{rng.choice(CLASSES['size'])} " if rng.random() < 0.5 else ""
    motion = f" moving {rng.choice(CLASSES['motion'])}" if modality == "video" and rng.random() < 0.5 else ""
    return f"a {size}{colour} {shape}{motion}"


def outside_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    modality: WorldModality = rng.choice(["image", "video", "audio"])
    text = _phrase(rng, CREATE, split, modality, wrapped=True).format(x=outside_request(rng, split, modality))
    return Conversation([Turn(role="user", text=text)], [], CAN_MAKE, [])


def typed(text: str, bare: bool = True, lower: bool = True) -> str:
    """``text`` as people often type it: without its final stop (``bare``), with a lower-case first letter."""
    if bare:
        text = text.rstrip(".!?") or text
    return text[:1].lower() + text[1:] if lower else text


def as_typed(rng: random.Random, text: str) -> str:
    """``typed`` at stage 3's rates: each change drawn on its own."""
    bare = rng.random() < TYPED_BARE_RATE
    return typed(text, bare=bare, lower=rng.random() < TYPED_LOWER_RATE)


# System prompts that clients send before the first user turn (OpenAI-compatible clients often do), which the
# server folds into that turn ("You are a helpful assistant. hello"). With none in training, "hello" after "You
# are a helpful assistant." got CAN_MAKE, and after "You are a helpful assistant that makes images." a tone (probed
# through /v1/chat/completions). In training, a conversation's first user turn has one before it at SYSTEM_RATE.
SYSTEM = {
    "train": ["You are a helpful assistant.", "You are a helpful assistant that makes images.", "Be concise.",
              "You are an AI assistant.", "Answer briefly.", "You are a friendly bot.", "Always be polite.",
              "You are a creative assistant.", "Keep answers short.", "You are an expert artist.",
              "You are NExT-GPT, a multimodal model.", "Reply in English.", "You are a useful AI that can draw."],
    "eval": ["Act as a careful helper.", "Respond in plain language, please."],
}
SYSTEM_RATE = 0.3


Task = Callable[[random.Random, Split, Draw], Conversation]
# The single-request tasks (weights), which also serve as the second request of a conversation. Open requests at 0.8
# (0.5 before small talk): next to things outside the world ("Draw a cat."), 1500 steps with them at 0.5 made
# "Draw a picture." a thing outside the world.
SINGLE_REQUESTS: tuple[tuple[Task, float], ...] = (
    (describe_task, 2.0), (question_task, 1.0), (create_task, 3.0), (open_create_task, 0.8),
    (image_to_video_task, 1.0), (video_to_image_task, 0.5), (two_media_task, 1.0), (small_talk_task, 0.6),
    (outside_task, 0.4),
)


def _earlier_exchange(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    """A finished first exchange: a description, an answer, or something made (its classes drawn from the data,
    since what an assistant turn made comes back to the model as an input medium)."""
    kind = rng.choice(["describe", "question", "create"])
    if kind == "describe":
        return describe_task(rng, split, draw)
    if kind == "question":
        return question_task(rng, split, draw)
    modality: WorldModality = rng.choice(["image", "video", "audio"])
    return _create(rng, split, modality, draw(modality))


def another_request_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    """A new request after one or more earlier exchanges, answered on its own. Trained on single requests and the
    recolour follow-up only, the model got most second requests of a conversation wrong (a second drawing had the
    shape asked for 29% of the time through the API, 2-3 of 8 in training phrasings); trained on one earlier
    exchange only, it fell apart as a served conversation grew (a picture drawn as asked at turns 10-29 of a
    conversation of drawings: 7 of 40), so up to six earlier exchanges come before the request."""
    count = rng.choices(EARLIER_EXCHANGES, weights=EARLIER_WEIGHTS)[0]
    turns: list[Turn] = []
    inputs: list[tuple[WorldModality, Attributes]] = []
    for _ in range(count):
        earlier = _earlier_exchange(rng, split, draw)
        turns += _shifted(earlier.turns, len(inputs))
        made = len(inputs) + len(earlier.inputs)  # the earlier reply's media follow its inputs
        turns.append(Turn(role="assistant", text=earlier.reply, media=list(range(made, made + len(earlier.outputs)))))
        inputs += [*earlier.inputs, *earlier.outputs]
    tasks, weights = zip(*SINGLE_REQUESTS)
    now = rng.choices(tasks, weights=weights)[0](rng, split, draw)
    return Conversation([*turns, *_shifted(now.turns, len(inputs))], [*inputs, *now.inputs], now.reply, now.outputs)


def _shifted(turns: list[Turn], by: int) -> list[Turn]:
    return [Turn(role=t.role, text=t.text, media=[i + by for i in t.media]) for t in turns]


# How many exchanges come before a new request (mostly one, as a second request; up to six, as a long chat).
EARLIER_EXCHANGES, EARLIER_WEIGHTS = (1, 2, 3, 4, 5, 6), (6, 2, 2, 1, 1, 1)


def about_made_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    """A question about what the assistant made a turn earlier, with no medium of its own ("What is in this
    picture?", "What colour is it?" after "Draw ..."), answered from what was made (which comes back to the model
    as an input medium, as served history does). Without it the model drew the picture again: "What is in this
    picture?" after a drawing got " Here is a big green square." and a new picture (probed through the API)."""
    modality: WorldModality = rng.choice(["image", "video", "audio"])
    attrs = draw(modality)
    earlier = _create(rng, split, modality, attrs)
    if rng.random() < 0.5:
        text, reply = _phrase(rng, DESCRIBE, split, modality, wrapped=True), described(modality, attrs)
    else:
        name = rng.choice(ATTRIBUTES[modality])
        text, reply = _attribute_question(rng, split, name, "it"), ANSWERS[name].format(value=getattr(attrs, name))
    return Conversation(_after_made(earlier, text), [(modality, attrs)], reply, [])


def _after_made(earlier: Conversation, text: str) -> list[Turn]:
    """``earlier``'s request, its reply with what it made (which comes back to the model as input medium 0, as
    served history does), then the user's ``text`` about it."""
    return [*earlier.turns, Turn(role="assistant", text=earlier.reply, media=[0]), Turn(role="user", text=text)]


def animate_made_task(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    """A picture the assistant drew, then set in motion ("Make it move left." after "Draw ..."): a clip of that
    shape in that colour, moving as asked. Stage 3 animated only pictures the user sent; asked of its own picture,
    the model answered with what it can make (CAN_MAKE) and made nothing (probed through the API)."""
    still = draw("image")
    text, clip = _animated(rng, split, still)
    earlier = _create(rng, split, "image", still)
    return Conversation(_after_made(earlier, text), [("image", still)], f"Here is {caption('video', clip)}.",
                        [("video", clip)])


# Stage 3's mix (weights): every direction of the any-to-any model, several media, a follow-up (a new colour, or
# set in motion), a second request, a question about what was made, one about a medium never sent (not a second
# request: after an exchange that made something, "What is in this picture?" is about_made_task's).
INSTRUCT_MIX: tuple[tuple[Task, float], ...] = (
    *SINGLE_REQUESTS, (follow_up_task, 1.2), (animate_made_task, 0.5), (another_request_task, 0.8),
    (about_made_task, 0.5), (nothing_sent_task, 0.5),
)


def encoder_alignment(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    """Stage 1: X -> caption, with the release's short caption-generation instruction (bare, never wrapped)."""
    return describe_task(rng, split, draw, wrapped=False)


def decoder_alignment(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    """Stage 2: the caption as input, the modality's signal group as the whole target (as the release does)."""
    modality: WorldModality = rng.choice(["image", "video", "audio"])
    attrs = random_attrs(rng, modality)
    return Conversation([Turn(role="user", text=caption(modality, attrs))], [], "", [(modality, attrs)])


def instruction(rng: random.Random, split: Split, draw: Draw) -> Conversation:
    """Stage 3: a conversation of the mix; in training, its user turns sometimes as typed (``as_typed``) and its
    first one sometimes after a system prompt (``SYSTEM``)."""
    tasks, weights = zip(*INSTRUCT_MIX)
    conversation = rng.choices(tasks, weights=weights)[0](rng, split, draw)
    if split == "eval":
        return conversation
    turns = [t.model_copy(update={"text": as_typed(rng, t.text)}) if t.role == "user" else t
             for t in conversation.turns]
    if rng.random() < SYSTEM_RATE:
        turns[0] = turns[0].model_copy(update={"text": with_system([rng.choice(SYSTEM["train"])], turns[0].text)})
    return replace(conversation, turns=turns)
