"""Signal-token groups during decoding: a group, once started, is forced to completion (the reference crashes on
a partial group); stray non-first signal tokens and disallowed modalities are masked; ``require_modalities``
turns a stop (or the end of the token budget) into the group the reply still owes."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.contracts.bundle_manifest import BundleManifest, Modality
from services.contracts.errors import InvalidRequestError


def check_signal_budget(manifest: BundleManifest, require_modalities: list[Modality], max_tokens: int | None) -> None:
    """A reply's token budget covers its signal groups. The groups ``require_modalities`` asks for must fit in it
    (a group is never cut, and a required one never dropped), so a budget too small for them is the caller's
    error, named with the number that would do; so is a required modality this bundle cannot produce."""
    missing = [m for m in require_modalities if m not in manifest.outputs]
    if missing:
        raise InvalidRequestError(f"require_modalities: this model cannot produce {missing}; it produces "
                                  f"{sorted(manifest.outputs)}", code="unsupported_modality",
                                  param="require_modalities")
    required = list(dict.fromkeys(require_modalities))
    needed = sum(len(manifest.outputs[m].signal.token_ids) for m in required)
    budget = max_tokens or manifest.generation.max_new_tokens
    if needed > budget:
        raise InvalidRequestError(
            f"max_tokens {budget} cannot hold the required {', '.join(required)}: their signal tokens alone take "
            f"{needed}; ask for max_tokens >= {needed} (more for text)", code="max_tokens_too_small",
            param="max_tokens")


@dataclass
class Group:
    modality: Modality
    start: int  # index of the first signal token in the generated ids
    index: int  # n-th group of the reply
    forced: bool


@dataclass
class Decision:
    forced: int | None = None
    banned: set[int] = field(default_factory=set)


class SignalController:
    def __init__(self, manifest: BundleManifest, allowed: list[Modality] | None, required: list[Modality],
                 max_groups: int, stop_ids: list[int]) -> None:
        self.groups = {m: list(spec.signal.token_ids) for m, spec in manifest.outputs.items()}
        self.first = {ids[0]: m for m, ids in self.groups.items()}
        self.rest = {i for ids in self.groups.values() for i in ids[1:]}
        self.allowed = set(self.groups) if allowed is None else set(allowed) & set(self.groups)
        self.required = [m for m in dict.fromkeys(required) if m in self.groups]
        self.max_groups = max_groups
        self.stop_ids = set(stop_ids)
        self.emitted: list[Group] = []
        self._queue: list[int] = []
        self._current: Group | None = None
        self._next_forced = False

    @property
    def in_group(self) -> bool:
        return self._current is not None

    def pending(self) -> list[Modality]:
        done = {g.modality for g in self.emitted}
        current = {self._current.modality} if self._current else set()
        return [m for m in self.required if m not in done | current]

    def decide(self, remaining_tokens: int) -> Decision:
        if self._queue:
            return Decision(forced=self._queue[0])
        banned = set(self.rest)
        if len(self.emitted) >= self.max_groups:
            banned |= set(self.first)
        else:
            banned |= {i for i, m in self.first.items() if m not in self.allowed}
        pending = self.pending()
        owed = sum(len(self.groups[m]) for m in pending)
        if pending and remaining_tokens <= owed:
            # The budget only just fits what the reply owes: start it now.
            self._next_forced = True
            return Decision(forced=self.groups[pending[0]][0])
        # A group the model starts on its own must leave room (tokens and groups) for what is still owed.
        room = self.max_groups - len(self.emitted) - len(pending)
        for first, modality in self.first.items():
            if modality in pending:
                continue
            if room <= 0 or remaining_tokens - len(self.groups[modality]) < owed:
                banned.add(first)
        return Decision(banned=banned)

    def redirect_stop(self, token: int) -> int | None:
        """A sampled stop while a required modality is still owed becomes that modality's first token."""
        pending = self.pending()
        if token in self.stop_ids and pending and not self._queue:
            self._next_forced = True
            return self.groups[pending[0]][0]
        return None

    def observe(self, token: int, position: int) -> Group | None:
        """Record a generated token; returns the group it completes, if any."""
        if self._queue:
            self._queue.pop(0)
        elif token in self.first:
            modality = self.first[token]
            self._current = Group(modality, position, len(self.emitted), forced=self._next_forced)
            self._queue = self.groups[modality][1:]
        self._next_forced = False
        if self._current is not None and not self._queue:
            done, self._current = self._current, None
            self.emitted.append(done)
            return done
        return None

    def is_signal(self, token: int) -> bool:
        return token in self.first or token in self.rest
