"""What ``ChatService.run`` emits for one turn: typed events. Those a client sees carry their SSE name and payload
(DESIGN.md's event list); ``ReplyAccepted`` (a streamed answer may start) and ``TextComplete`` (the non-streaming
collectors start their media wait there) are internal and never reach the wire."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from services.contracts.chat import ArtifactOut


@dataclass(frozen=True)
class MessageDelta:
    name: ClassVar[str] = "message.delta"
    text: str


@dataclass(frozen=True)
class SignalChosen:
    name: ClassVar[str] = "signal"
    modality: str
    index: int
    forced: bool


@dataclass(frozen=True)
class ArtifactQueued:
    name: ClassVar[str] = "artifact.queued"
    job_id: str
    modality: str
    index: int


@dataclass(frozen=True)
class ArtifactProgress:
    name: ClassVar[str] = "artifact.progress"
    job_id: str
    step: int | None
    total: int | None


@dataclass(frozen=True)
class ArtifactCompleted:
    name: ClassVar[str] = "artifact.completed"
    artifact: ArtifactOut

    def data(self) -> dict[str, Any]:
        return self.artifact.model_dump()


@dataclass(frozen=True)
class ArtifactFailed:
    name: ClassVar[str] = "artifact.failed"
    job_id: str
    modality: str
    error: str

    def as_artifact(self) -> ArtifactOut:
        """The failed item as the answers list it."""
        return ArtifactOut(job_id=self.job_id, modality=self.modality, state="failed", error=self.error)


@dataclass(frozen=True)
class ReplyAccepted:
    """The LLM took the request (its checks passed): a streamed answer may start. Internal, like TextComplete."""

    prompt_tokens: int


@dataclass(frozen=True)
class TextComplete:
    """The text is complete and the turn saved; media may still be decoding."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # the first token's and the text's (as TurnDone's)


@dataclass(frozen=True)
class TurnDone:
    name: ClassVar[str] = "done"
    conversation_id: str
    finish_reason: str
    text: str
    usage: dict[str, int]
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # without their bytes: those went out once
    timings: dict[str, float] = field(default_factory=dict)


TurnEvent = (MessageDelta | SignalChosen | ArtifactQueued | ArtifactProgress | ArtifactCompleted | ArtifactFailed
             | ReplyAccepted | TextComplete | TurnDone)


def wire(event: TurnEvent) -> tuple[str, dict[str, Any]] | None:
    """The SSE name and payload of an event a client sees; None for internal ones."""
    if isinstance(event, MessageDelta):  # one per token: dataclasses.asdict's deep copy is most of its cost
        return event.name, {"text": event.text}
    if isinstance(event, (TextComplete, ReplyAccepted)):
        return None
    if isinstance(event, ArtifactCompleted):
        return event.name, event.data()
    return event.name, asdict(event)
