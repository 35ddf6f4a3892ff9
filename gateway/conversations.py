"""Conversation history for multi-turn chat: turns with their media vectors. Embedded mode keeps it in memory
(LRU bounded); distributed mode in Redis with a TTL, so any gateway replica can continue a conversation.
Generated media are kept by artifact key and encoded again on later turns, as the reference does.

Two turns of one conversation may run at once (a client that does not wait for the first's text). Each is answered
from the conversation as it was loaded; saving never loses the other's exchange: a save finding that someone saved
since its load writes the stored turns followed by its own new ones (its updates to the loaded turns, media encoded
on the way, are a cache: the next turn redoes them)."""

from __future__ import annotations

import abc
import base64
import dataclasses
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis


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
    revision: int = 0  # saves so far: a save compares it with the stored one to see whether another turn saved
    loaded: int = 0  # turns it had when loaded: the ones after are this turn's own
    # Its first request's system messages: kept apart from the turns, so that they open every prompt of it, where
    # its oldest turns are left out (of the prompt, or of what is kept: ``max_turns``).
    system: list[str] = field(default_factory=list)

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

    def _merged(self, stored: Conversation | None, ours: Conversation) -> Conversation:
        """What a save writes: ``ours`` when nobody saved since it was loaded, else the stored turns followed by
        its own new ones; bounded to the last ``max_turns``, one revision on."""
        if stored is None or stored.revision == ours.revision:
            turns, revision = ours.turns, ours.revision
        else:
            turns, revision = stored.turns + ours.turns[ours.loaded:], max(stored.revision, ours.revision)
        kept = turns[-self.max_turns:]
        system = stored.system if stored is not None else ours.system
        return Conversation(ours.id, ours.owner, kept, revision + 1, len(kept), system)

    @staticmethod
    def _saved(conversation: Conversation, written: Conversation) -> None:
        """The caller's object follows what was written: a later save of it is a save after this one."""
        conversation.turns, conversation.revision, conversation.loaded = written.turns, written.revision, \
            written.loaded


def _copy(conversation: Conversation) -> Conversation:
    """A loaded conversation its turn may change (encoding earlier media into it) without touching the stored one
    or another turn's copy."""
    turns = [dataclasses.replace(t, vectors=list(t.vectors), artifact_keys=list(t.artifact_keys),
                                 pending_jobs=list(t.pending_jobs)) for t in conversation.turns]
    return Conversation(conversation.id, conversation.owner, turns, conversation.revision, len(turns),
                        list(conversation.system))


class MemoryConversationStore(ConversationStore):
    def __init__(self, max_conversations: int = 1000, max_turns: int = 64, ttl_s: float | None = None) -> None:
        super().__init__(max_turns)
        self.max_conversations, self.ttl_s = max_conversations, ttl_s
        self._items: OrderedDict[str, tuple[float, Conversation]] = OrderedDict()
        self._lock = threading.Lock()

    def _live(self, conversation_id: str) -> Conversation | None:
        """The stored conversation, unless expired (then forgotten); under the lock."""
        entry = self._items.get(conversation_id)
        if entry is None:
            return None
        saved_at, found = entry
        if self.ttl_s is not None and time.monotonic() - saved_at > self.ttl_s:
            del self._items[conversation_id]
            return None
        return found

    async def load(self, conversation_id: str, owner: str | None) -> Conversation | None:
        with self._lock:
            found = self._live(conversation_id)
            if found is None or found.owner != owner:
                return None
            self._items.move_to_end(conversation_id)
            return _copy(found)

    async def save(self, conversation: Conversation) -> None:
        with self._lock:
            written = self._merged(self._live(conversation.id), conversation)
            self._items[conversation.id] = (time.monotonic(), _copy(written))
            self._items.move_to_end(conversation.id)
            while len(self._items) > self.max_conversations:
                self._items.popitem(last=False)
        self._saved(conversation, written)


class RedisConversationStore(ConversationStore):
    """One JSON value per conversation under the key prefix, expiring ``ttl_s`` after its last turn. A save is
    a read-merge-write under WATCH: two replicas saving turns of one conversation at once both keep theirs."""

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
        key = self._key(conversation.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    written = self._merged(decode_conversation(raw) if raw is not None else None, conversation)
                    pipe.multi()
                    pipe.set(key, encode_conversation(written), ex=self.ttl_s)
                    await pipe.execute()
                    break
                except redis.WatchError:  # another turn saved between our read and write: merge with it
                    continue
        self._saved(conversation, written)


def encode_conversation(conversation: Conversation) -> bytes:
    def vectors(turn: StoredTurn) -> dict[str, Any] | None:
        if not turn.vectors:
            return None
        stacked = np.stack(turn.vectors).astype("<f4")
        return {"shape": list(stacked.shape), "data": base64.b64encode(stacked.tobytes()).decode()}

    return json.dumps({
        "id": conversation.id, "owner": conversation.owner, "revision": conversation.revision,
        "system": conversation.system,
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
    return Conversation(body["id"], body["owner"], turns, body.get("revision", 0), len(turns),
                        list(body.get("system", [])))
