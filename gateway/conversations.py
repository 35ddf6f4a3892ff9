"""Conversation history for multi-turn chat: turns with their media vectors. Embedded mode keeps it in memory
(LRU bounded); distributed mode in Redis with a TTL, so any gateway replica can continue a conversation.
Generated media are kept by artifact key and encoded again on later turns, as the reference does."""

from __future__ import annotations

import abc
import base64
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class StoredTurn:
    role: str
    text: str
    vectors: list[np.ndarray] = field(default_factory=list)  # encoded media, in order
    artifact_keys: list[str] = field(default_factory=list)  # generated media not encoded yet
    # Decode jobs of this (assistant) turn still running when it was saved: they join the turn when a later turn
    # finds them completed; until then a later turn sees the reply without them.
    pending_jobs: list[str] = field(default_factory=list)


@dataclass
class Conversation:
    id: str
    owner: str | None
    turns: list[StoredTurn] = field(default_factory=list)

    @classmethod
    def new(cls, owner: str | None) -> Conversation:
        return cls(uuid.uuid4().hex, owner)


class ConversationStore(abc.ABC):
    """``load`` answers None for a missing, expired or someone else's conversation: all look the same."""

    def __init__(self, max_turns: int) -> None:
        self.max_turns = max_turns

    @abc.abstractmethod
    async def load(self, conversation_id: str, owner: str | None) -> Conversation | None: ...

    @abc.abstractmethod
    async def save(self, conversation: Conversation) -> None: ...

    def _bounded(self, conversation: Conversation) -> Conversation:
        return Conversation(conversation.id, conversation.owner, list(conversation.turns[-self.max_turns:]))


class MemoryConversationStore(ConversationStore):
    def __init__(self, max_conversations: int = 1000, max_turns: int = 64, ttl_s: float | None = None) -> None:
        super().__init__(max_turns)
        self.max_conversations, self.ttl_s = max_conversations, ttl_s
        self._items: OrderedDict[str, tuple[float, Conversation]] = OrderedDict()
        self._lock = threading.Lock()

    async def load(self, conversation_id: str, owner: str | None) -> Conversation | None:
        with self._lock:
            entry = self._items.get(conversation_id)
            if entry is None or entry[1].owner != owner:
                return None
            saved_at, found = entry
            if self.ttl_s is not None and time.monotonic() - saved_at > self.ttl_s:
                del self._items[conversation_id]
                return None
            self._items.move_to_end(conversation_id)
            return Conversation(found.id, found.owner, list(found.turns))

    async def save(self, conversation: Conversation) -> None:
        with self._lock:
            self._items[conversation.id] = (time.monotonic(), self._bounded(conversation))
            self._items.move_to_end(conversation.id)
            while len(self._items) > self.max_conversations:
                self._items.popitem(last=False)


class RedisConversationStore(ConversationStore):
    """One JSON value per conversation under the key prefix, expiring ``ttl_s`` after its last turn. Two turns
    of one conversation running at once: the later save wins (a client should wait for ``done``)."""

    def __init__(self, redis: Any, key_prefix: str, ttl_s: int, max_turns: int = 64) -> None:
        super().__init__(max_turns)
        self.redis, self.prefix, self.ttl_s = redis, key_prefix, ttl_s

    def _key(self, conversation_id: str) -> str:
        return f"{self.prefix}conversation:{conversation_id}"

    async def load(self, conversation_id: str, owner: str | None) -> Conversation | None:
        raw = await self.redis.get(self._key(conversation_id))
        if raw is None:
            return None
        conversation = decode_conversation(raw)
        return conversation if conversation.owner == owner else None

    async def save(self, conversation: Conversation) -> None:
        await self.redis.set(self._key(conversation.id), encode_conversation(self._bounded(conversation)),
                             ex=self.ttl_s)


def encode_conversation(conversation: Conversation) -> bytes:
    def vectors(turn: StoredTurn) -> dict[str, Any] | None:
        if not turn.vectors:
            return None
        stacked = np.stack(turn.vectors).astype("<f4")
        return {"shape": list(stacked.shape), "data": base64.b64encode(stacked.tobytes()).decode()}

    return json.dumps({
        "id": conversation.id, "owner": conversation.owner,
        "turns": [{"role": t.role, "text": t.text, "vectors": vectors(t), "artifact_keys": t.artifact_keys,
                   "pending_jobs": t.pending_jobs} for t in conversation.turns],
    }).encode()


def decode_conversation(raw: bytes) -> Conversation:
    body = json.loads(raw)
    turns = []
    for t in body["turns"]:
        vectors: list[np.ndarray] = []
        if t["vectors"]:
            array = np.frombuffer(base64.b64decode(t["vectors"]["data"]), dtype="<f4").reshape(t["vectors"]["shape"])
            vectors = list(array.astype(np.float32))
        turns.append(StoredTurn(t["role"], t["text"], vectors, list(t["artifact_keys"]),
                                list(t.get("pending_jobs", []))))
    return Conversation(body["id"], body["owner"], turns)
