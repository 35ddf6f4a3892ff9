"""The world's text: what the language model stand-in reads before NExT-GPT's stages (Vicuna's part).

Captions, and text-only conversations in the Vicuna v0 layout (``### Human: ... ### Assistant: ...###``) about
things described in words: their colour, shape, size, motion, pitch and rhythm, asked in many phrasings.
"""

from __future__ import annotations

import random

from services.world.attributes import ATTRIBUTES, WORLD_MODALITIES, Attributes, caption
from services.world.render import render

QUESTIONS = {
    "colour": ["What colour is {thing}?", "Which colour does {thing} have?", "Tell me the colour of {thing}."],
    "shape": ["What shape is {thing}?", "Which shape is {thing}?", "Name the shape of {thing}."],
    "size": ["Is {thing} big or small?", "How big is {thing}?", "What size is {thing}?"],
    "motion": ["Which way is {thing} going?", "In which direction does {thing} move?", "Where is {thing} heading?"],
    "pitch": ["Is {thing} high or low?", "What pitch is {thing}?", "How high is {thing}?"],
    "rhythm": ["Is {thing} steady or beeping?", "Does {thing} beep?", "What rhythm does {thing} have?"],
}
ANSWERS = {
    "colour": "It is {value}.", "shape": "It is a {value}.", "size": "It is {value}.",
    "motion": "It is moving {value}.", "pitch": "It is {value}.", "rhythm": "It is {value}.",
}
REPEATS = ["Say {thing} again.", "Repeat: {thing}.", "Write the words: {thing}."]
GREETINGS = [("Hello!", "Hello! I can look at pictures, clips and sounds, and make them."),
             ("Who are you?", "I am an assistant that sees pictures, watches clips, hears sounds and makes them."),
             ("Thank you.", "You are welcome.")]


def turn(human: str, assistant: str) -> str:
    return f"### Human: {human}\n### Assistant: {assistant}\n###"


def text_sample(rng: random.Random, attrs: Attributes, modality: str) -> str:
    thing = caption(modality, attrs)  # type: ignore[arg-type]
    kind = rng.random()
    if kind < 0.15:
        return thing.capitalize() + "."
    if kind < 0.25:
        return turn(rng.choice(REPEATS).format(thing=thing), thing.capitalize() + ".")
    if kind < 0.3:
        return turn(*rng.choice(GREETINGS))
    name = rng.choice(ATTRIBUTES[modality])  # type: ignore[index]
    question = rng.choice(QUESTIONS[name]).format(thing=thing)
    return turn(question, ANSWERS[name].format(value=getattr(attrs, name)))


def text_corpus(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        modality = WORLD_MODALITIES[i % 3]
        out.append(text_sample(rng, render(modality, seed, i).attributes, modality))
    return out
