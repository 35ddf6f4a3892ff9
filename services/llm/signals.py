"""Signal-token groups during decoding: a group, once started, is forced to completion (the reference crashes on
a partial group); stray non-first signal tokens are masked; ``require_modalities`` turns a stop (or the end of the
token budget) into the group the reply still owes.

A group the reply may not make (its modality not allowed, or ``max_signal_groups`` used up) is not masked: where
the model starts one, its tokens run but nothing is decoded, so the model goes on as it would after it (masked,
its next-best token was text that trailed off: "Here is a blue triangle. and a big blue triangle an ..."). A group
that no longer fits the token budget ends the reply there ("length"), rather than push the model into text it
never meant to write."""

from __future__ import annotations

from dataclasses import dataclass

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
    made: bool = True  # False: its tokens ran, but the reply may not make it (nothing is decoded)


@dataclass
class Decision:
    forced: int | None = None
    banned: frozenset[int] = frozenset()


class SignalController:
    def __init__(self, manifest: BundleManifest, allowed: list[Modality] | None, required: list[Modality],
                 max_groups: int, stop_ids: list[int]) -> None:
        self.groups = {m: list(spec.signal.token_ids) for m, spec in manifest.outputs.items()}
        self.first = {ids[0]: m for m, ids in self.groups.items()}
        # Masked at every free step (a group is only ever entered by its first token): one set, never copied.
        self.rest = frozenset(i for ids in self.groups.values() for i in ids[1:])
        self.allowed = set(self.groups) if allowed is None else set(allowed) & set(self.groups)
        self.required = [m for m in dict.fromkeys(required) if m in self.groups]
        self.max_groups = max_groups
        self.stop_ids = set(stop_ids)
        self.emitted: list[Group] = []  # groups made
        self._queue: list[int] = []
        self._current: Group | None = None
        self._next_forced = False
        self._next_unmade = False

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
        pending = self.pending()
        owed = sum(len(self.groups[m]) for m in pending)
        if pending and remaining_tokens <= owed:
            # The budget only just fits what the reply owes: start it now.
            self._next_forced = True
            return Decision(forced=self.groups[pending[0]][0])
        return Decision(banned=self.rest)

    def choose(self, token: int, remaining_tokens: int) -> int | None:
        """What a sampled token becomes: itself; a stop, or a group that cannot be made or would crowd out what
        the reply owes, turned into the owed group's first token; None where the reply ends for lack of budget
        (a group started there could not finish: the finish reason is "length")."""
        pending = self.pending()
        owed = sum(len(self.groups[m]) for m in pending)
        if token in self.stop_ids:
            return self._owed(pending) if pending else token
        modality = self.first.get(token)
        if modality is None or modality in pending:
            return token
        makeable = modality in self.allowed and len(self.emitted) + len(pending) < self.max_groups
        fits = remaining_tokens - len(self.groups[modality]) >= owed
        if pending and not (makeable and fits):
            return self._owed(pending)
        if not fits:
            return None
        self._next_unmade = not makeable
        return token

    def _owed(self, pending: list[Modality]) -> int:
        self._next_forced = True
        return self.groups[pending[0]][0]

    def observe(self, token: int, position: int) -> Group | None:
        """Record a generated token; returns the group it completes, if any."""
        if self._queue:
            self._queue.pop(0)
        elif token in self.first:
            modality = self.first[token]
            self._current = Group(modality, position, len(self.emitted), forced=self._next_forced,
                                  made=not self._next_unmade)
            self._queue = self.groups[modality][1:]
        self._next_forced = self._next_unmade = False
        if self._current is not None and not self._queue:
            done, self._current = self._current, None
            if done.made:
                self.emitted.append(done)
            return done
        return None

    def is_signal(self, token: int) -> bool:
        return token in self.first or token in self.rest
