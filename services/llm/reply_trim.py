"""A reply's text without the whitespace it starts and ends with.

The model writes a space first (the one after ``Assistant:``: a byte-level BPE reply's first token carries it)
and a newline last (the one before the ``###`` separator): both are layout, not the answer, and a client showed
``" Here is a red square.\\n"``. Streamed text is trimmed as it goes: whitespace is held back until text follows
it (it was inside the reply) or the reply ends (it was the end, and is dropped). The backends keep the model's
text as it is (their tests compare it with the tokens); the conversation history takes either form, since the
prompt builder strips a stored reply itself."""

from __future__ import annotations

from collections.abc import Callable

from services.contracts.llm import LLMEvent, TextDelta


class ReplyTrim:
    """Wraps a generation's ``emit``: text deltas go on trimmed, every other event as it is."""

    def __init__(self, emit: Callable[[LLMEvent], None]) -> None:
        self.emit = emit
        self._started = False  # some text other than whitespace went out
        self._held = ""  # whitespace after the last text, out once text follows it

    def __call__(self, event: LLMEvent) -> None:
        if not isinstance(event, TextDelta):
            self.emit(event)
            return
        text = event.text if self._started else event.text.lstrip()
        body = text.rstrip()
        if not body:
            if self._started:
                self._held += text
            return
        self._started = True
        out, self._held = self._held + body, text[len(body):]
        self.emit(TextDelta(out))
