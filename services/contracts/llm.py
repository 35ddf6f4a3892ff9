"""The LLM boundary: a conversation (text + one LLM-space vector per media item) in; a stream of text deltas,
signal events (modality + conditioning tensor) and a final ``done`` out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from services.contracts.bundle_manifest import Modality


# OpenAI's bounds: up to 4 stop strings; each is held back while it may be starting, so each is short.
StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    text: str = Field(default="", max_length=100_000)
    # Indices into the request's media vectors, in the order they appear in this turn.
    media: list[int] = Field(default_factory=list)


class GenerateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    turns: list[Turn] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    lora: str | None = Field(default=None, description="LoRA adapter name; default: the bundle's default adapter")
    allowed_modalities: list[Modality] | None = Field(default=None, description="None: every output modality")
    require_modalities: list[Modality] = Field(default_factory=list)
    max_signal_groups: int = Field(default=4, ge=0, le=16)
    stop: list[StopString] = Field(
        default_factory=list, max_length=4, description="The reply's text ends before the first of these (not sent)")
    system: list[Annotated[str, Field(max_length=100_000)]] = Field(
        default_factory=list, max_length=256,
        description="Instructions that open the prompt: the model, as the reference, has no system prompt, so they "
                    "join the words of the prompt's first turn (whichever that is once old exchanges are left out)")
    history_turns: int = Field(
        default=0, ge=0, description="How many leading turns are the conversation the server keeps (not the "
                                     "caller's own messages): where the prompt and the reply's budget would not fit "
                                     "the model's context, its oldest exchanges are left out of the prompt")

    @model_validator(mode="after")
    def _consistent(self) -> GenerateParams:
        if self.turns[-1].role != "user":
            raise ValueError("the last turn must be the user's")
        if self.history_turns >= len(self.turns):
            raise ValueError("history_turns must leave the request's own turns")
        if self.allowed_modalities is not None and set(self.require_modalities) - set(self.allowed_modalities):
            raise ValueError("require_modalities must be a subset of allowed_modalities")
        if len(set(self.require_modalities)) > self.max_signal_groups:
            raise ValueError("more required modalities than max_signal_groups")
        return self


@dataclass
class Accepted:
    """The request passed the service's checks (its prompt fits the context, its adapter exists) and waits for
    or takes its place in the batch: the first event of every reply. A caller may answer its own client with a
    success status from here; what fails later arrives as an error inside the stream."""

    prompt_tokens: int
    type: Literal["accepted"] = "accepted"


@dataclass
class TextDelta:
    text: str
    type: Literal["delta"] = "delta"


@dataclass
class SignalEvent:
    modality: Modality
    index: int  # the n-th signal group of this reply
    conditioning: np.ndarray  # the projector's output for the group, e.g. (77, 768)
    forced: bool = False  # True when require_modalities made the group, not the model
    type: Literal["signal"] = "signal"


@dataclass
class Done:
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)  # every generated id, signal tokens included
    type: Literal["done"] = "done"


LLMEvent = Accepted | TextDelta | SignalEvent | Done


class LLMClient(ABC):
    @abstractmethod
    def generate(self, params: GenerateParams, media: np.ndarray | None) -> AsyncIterator[LLMEvent]:
        """Stream a reply; ``media`` is (items, llm_hidden). Closing the iterator cancels the generation."""

    @abstractmethod
    async def check_ready(self) -> None:
        """Raise ``ServiceUnavailableError`` until the LLM can serve."""


def _b64_tensor(array: np.ndarray) -> str:
    import base64

    from safetensors.numpy import save

    return base64.b64encode(save({"tensor": np.ascontiguousarray(array, dtype=np.float32)})).decode()


def _tensor_b64(text: str) -> np.ndarray:
    import base64

    from safetensors.numpy import load

    return load(base64.b64decode(text))["tensor"]


def event_to_json(event: LLMEvent) -> dict[str, object]:
    """One NDJSON line of the LLM service's stream; tensors travel as base64 safetensors."""
    if isinstance(event, Accepted):
        return {"type": "accepted", "prompt_tokens": event.prompt_tokens}
    if isinstance(event, TextDelta):
        return {"type": "delta", "text": event.text}
    if isinstance(event, SignalEvent):
        return {"type": "signal", "modality": event.modality, "index": event.index, "forced": event.forced,
                "conditioning": _b64_tensor(event.conditioning)}
    return {"type": "done", "finish_reason": event.finish_reason, "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens, "timings": event.timings, "token_ids": event.token_ids}


def event_from_json(data: dict[str, object]) -> LLMEvent:
    kind = data.get("type")
    if kind == "accepted":
        return Accepted(prompt_tokens=int(data["prompt_tokens"]))  # type: ignore[call-overload]
    if kind == "delta":
        return TextDelta(text=str(data["text"]))
    if kind == "signal":
        return SignalEvent(modality=data["modality"], index=int(data["index"]),  # type: ignore[arg-type]
                           conditioning=_tensor_b64(str(data["conditioning"])), forced=bool(data.get("forced")))
    if kind == "done":
        return Done(finish_reason=data["finish_reason"], prompt_tokens=int(data["prompt_tokens"]),  # type: ignore[arg-type]
                    completion_tokens=int(data["completion_tokens"]),  # type: ignore[arg-type]
                    timings=dict(data.get("timings") or {}), token_ids=list(data.get("token_ids") or []))  # type: ignore[arg-type]
    raise ValueError(f"unknown LLM event {kind!r}")


def media_to_b64(media: np.ndarray) -> str:
    return _b64_tensor(media)


def media_from_b64(text: str) -> np.ndarray:
    return _tensor_b64(text)


class GenerateRequest(BaseModel):
    """The LLM service's HTTP body: the params plus the media vectors as base64 safetensors."""

    model_config = ConfigDict(extra="forbid")

    params: GenerateParams
    media: str | None = Field(default=None, description="base64 safetensors, tensor 'tensor' (items, hidden)")
