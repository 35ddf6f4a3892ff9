"""Stop strings (OpenAI's ``stop``): the reply's text ends just before the first of them, which is not sent.

Text reaches the client as it is decoded, so whatever could still turn out to be the start of a stop string is
held back until the next text shows it is not (or the reply ends), and a client never sees a piece of a stop
string. Both backends filter their text through this, over the whole reply: the vLLM backend's reply spans one
vLLM request per signal group, and a stop string may straddle two.

The whitespace a reply starts with (the space after ``Assistant:``) is layout, which the service trims
(``reply_trim``): no stop string matches it, so ``stop: [" "]`` ends "Here is a red square." after "Here" as a
client reading the text expects, not before the reply's first word.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Filtered:
    text: str  # what may go out now
    matched: bool  # a stop string was found: the reply's text ends with ``text``


class StopStrings:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.matched = False
        self._held = ""
        self._leading = True  # no text but whitespace yet: that whitespace is not searched

    def __bool__(self) -> bool:
        return bool(self.stops)

    def push(self, delta: str) -> Filtered:
        """The next decoded text; after a match, nothing more goes out."""
        if self.matched:
            return Filtered("", True)
        if not self.stops:
            return Filtered(delta, False)
        lead = ""
        if self._leading:
            body = delta.lstrip()
            lead, delta = delta[:len(delta) - len(body)], body
            if not delta:
                return Filtered(lead, False)
            self._leading = False
        text = self._held + delta
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.matched, self._held = True, ""
            return Filtered(lead + text[:min(found)], True)
        keep = self._partial(text)
        self._held = text[len(text) - keep:] if keep else ""
        return Filtered(lead + text[:len(text) - keep], False)

    def flush(self) -> str:
        """The reply ended without a match: what was held back was text after all."""
        held, self._held = self._held, ""
        return held

    def _partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that a stop string starts with."""
        for size in range(min(len(text), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0
