"""The gateway's public request and response shapes (``POST /v1/chat``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from services.contracts.bundle_manifest import Modality
from services.contracts.decoders import DecodeOptions
from services.contracts.ids import HEX_ID_PATTERN
from services.contracts.llm import StopString

ArtifactUrl = Annotated[str, Field(min_length=1, max_length=2048)]


def with_system(system: Sequence[str], content: str) -> str:
    """A first turn's words with the system prompts before them. The model (as the reference) has no system
    prompt: the prompt builder (``build_prompt_embeddings``) folds a conversation's system messages into its
    prompt's first turn this way, and stage 3 of the world trains on them this way."""
    return " ".join([*system, content]).strip()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(
        description="`system`: instructions, text only, before every other message of a conversation's first "
                    "request; the model has no system prompt, so they join the words of every prompt's first turn")
    content: str = Field(default="", max_length=100_000)
    files: list[str] = Field(default_factory=list, max_length=16, description="Names of uploaded `files` parts")
    artifacts: list[ArtifactUrl] = Field(
        default_factory=list, max_length=16,
        description="Media this server made, as the artifact URLs an answer gave (expired ones too): a stateless "
                    "client's history shows the model what it made (an assistant message's URLs that this server "
                    "did not sign, or whose media are gone, are left out), and a user message can ask about one "
                    "(there such a URL is a 400, or a 404 when its media are gone)")

    @model_validator(mode="after")
    def _user_says_something(self) -> ChatMessage:
        # An empty request is no question: the model would answer it with whatever its weights fall into.
        if self.role == "user" and not self.content.strip() and not self.files and not self.artifacts:
            raise ValueError("a user message needs text or files")
        if self.role == "system" and (self.files or self.artifacts):
            raise ValueError("a system message takes text only")
        return self


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool = False
    conversation_id: str | None = Field(default=None, pattern=HEX_ID_PATTERN)
    # strict: JSON true is not a number of tokens (lax validation would take it as 1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    lora: str | None = None
    stop: list[StopString] = Field(
        default_factory=list, max_length=4,
        description="Up to 4 strings: the reply's text ends before the first of them (not sent); media the reply "
                    "has signalled by then are still made, and require_modalities still holds")
    allowed_modalities: list[Modality] | None = None
    require_modalities: list[Modality] = Field(default_factory=list)
    decoder: DecodeOptions = Field(default_factory=DecodeOptions, description="Options for every generated item")
    wait_s: float = Field(default=120.0, ge=0, le=600, description="Non-streaming: how long to wait for media")
    inline_media: bool = Field(
        default=False, description="Also return each artifact's bytes as base64 (`data`), up to the server's bound")

    @field_validator("require_modalities")
    @classmethod
    def _required_are_allowed(cls, required: list[Modality], info: ValidationInfo) -> list[Modality]:
        allowed = info.data.get("allowed_modalities")
        if allowed is not None and set(required) - set(allowed):
            raise ValueError(f"{sorted(set(required) - set(allowed))} required but not in allowed_modalities")
        return required

    @field_validator("messages")
    @classmethod
    def _user_speaks_last(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages and messages[-1].role != "user":
            raise ValueError("the last message must be the user's: the reply answers it")
        return messages

    @field_validator("messages")
    @classmethod
    def _system_leads(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        opened = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
        if any(m.role == "system" for m in messages[opened:]):
            raise ValueError("system messages come before every other message")
        return messages

    def system(self) -> list[str]:
        """The system messages' words (they lead the messages)."""
        return [m.content for m in self.messages if m.role == "system"]


class ArtifactOut(BaseModel):
    job_id: str
    modality: Modality
    state: str
    url: str | None = None
    mime: str | None = None
    bytes: int | None = None
    error: str | None = None
    data: str | None = Field(default=None, description="Base64 bytes, when inline_media was asked for")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ChatResponse(BaseModel):
    conversation_id: str
    text: str
    artifacts: list[ArtifactOut]
    usage: Usage
    finish_reason: str
    timings: dict[str, float] = Field(default_factory=dict)


class StreamCancelled(BaseModel):
    """``POST /v1/chat/streams/{stream_id}/cancel``."""

    stream_id: str
    cancelled: bool = Field(description="False: the stream had already ended")
