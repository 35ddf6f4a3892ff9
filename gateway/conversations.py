"""Conversation history for multi-turn chat: turns with their media vectors (embedded mode: in memory, LRU
bounded). Generated media are kept by artifact key and encoded again on later turns, as the reference does."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StoredTurn:
    role: str
    text: str
    vectors: list[np.ndarray] = field(default_factory=list)  # encoded media, in order
    artifact_keys: list[str] = field(default_factory=list)  # generated media not encoded yet


@dataclass
class Conversation:
    id: str
    owner: str | None
    turns: list[StoredTurn] = field(default_factory=list)


class MemoryConversationStore:
    def __init__(self, max_conversations: int = 1000, max_turns: int = 64) -> None:
        self.max_conversations, self.max_turns = max_conversations, max_turns
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, conversation_id: str | None, owner: str | None) -> Conversation:
        with self._lock:
            if conversation_id is not None:
                found = self._items.get(conversation_id)
                # Someone else's conversation looks exactly like a missing one.
                if found is not None and found.owner == owner:
                    self._items.move_to_end(conversation_id)
                    return Conversation(found.id, found.owner, list(found.turns))
            return Conversation(conversation_id or uuid.uuid4().hex, owner)

    def exists_for(self, conversation_id: str, owner: str | None) -> bool:
        with self._lock:
            found = self._items.get(conversation_id)
            return found is not None and found.owner == owner

    def save(self, conversation: Conversation) -> None:
        with self._lock:
            conversation.turns = conversation.turns[-self.max_turns:]
            self._items[conversation.id] = conversation
            self._items.move_to_end(conversation.id)
            while len(self._items) > self.max_conversations:
                self._items.popitem(last=False)
