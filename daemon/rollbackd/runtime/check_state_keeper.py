"""The check states kept in the store, so that a restart neither forgets a breach under
way nor restarts its clock: restored at start, saved when they change, deleted with the
check.

A series restored firing makes no new FIRED transition after the restart, yet the
pipeline may never have recorded its firing (the daemon died in between): the keeper
remembers such series until each is seen breaching again (``restored_breaching``), so
that its firing is handed over once more.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import replace

from rollbackd.config.loader import LoadedConfig
from rollbackd.core.check_state import CheckState, Phase, Policy, SeriesState
from rollbackd.core.samples import Labels, Verdict
from rollbackd.logs import get_logger
from rollbackd.store.check_state_codec import StateFormatError, decode, encode
from rollbackd.store.errors import StoreError
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for

log = get_logger("rollbackd.engine")

Key = tuple[str, str]
"""(service, check)."""

_BLANK_STATE = encode(CheckState())
"""What a check with nothing worth restoring encodes to: it has no row in the store."""


def configured(loaded: LoadedConfig) -> set[Key]:
    """Every (service, check) of the config."""
    return {(s.name, c.name) for s in loaded.services.values() for c in s.rules.check}


class CheckStateKeeper:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._saved: dict[Key, str] = {}
        """(service, check) -> the state last written to the store (no entry: no row), so
        a state that did not change is not written again."""
        self._restored_firing: set[tuple[str, str, Labels]] = set()
        """Series restored firing, not yet seen breaching again since the restart."""
        self.may_save: Callable[[str], bool] = lambda service: True
        """Whether this daemon may write ``service``'s check states now: with several
        daemons, only while it holds the service (``Tenancy.may_act``). A daemon that goes
        on evaluating a lease that lapsed (the store was unreachable) must not overwrite
        what the service's new holder saves; its own state is saved once it holds the
        service again, as it then differs from what was last written."""

    def restore(self, loaded: LoadedConfig) -> dict[Key, CheckState]:
        """The states saved before a restart, for the checks configured now; the rows of
        checks no longer configured, or that cannot be read, are deleted."""
        wanted = configured(loaded)
        states: dict[Key, CheckState] = {}
        for key, row in self.store.check_states().items():
            if key not in wanted:
                self._delete_now(key)
                continue
            try:
                state = decode(row.state)
            except StateFormatError as exc:
                log.error(
                    "saved check state unreadable: the check starts over",
                    service=key[0],
                    check=key[1],
                    error=str(exc),
                )
                self._delete_now(key)
                continue
            states[key] = state
            self._saved[key] = encode(state)
            self._restored_firing.update((*key, labels) for labels in state.firing_series())
        return states

    def restore_services(
        self, loaded: LoadedConfig, services: Collection[str]
    ) -> dict[Key, CheckState]:
        """The states the services' previous holder saved, for a daemon taking them over:
        each series restored firing is handed over again at its first breaching evaluation,
        as after a restart. Unreadable rows are left for their holder (this one now) to
        overwrite."""
        wanted = {key for key in configured(loaded) if key[0] in services}
        states = {k: v for k, v in stored_states(self.store, services).items() if k in wanted}
        for key, state in states.items():
            self._saved[key] = encode(state)
            self._restored_firing.update((*key, labels) for labels in state.firing_series())
        for key in wanted - states.keys():
            self._saved.pop(key, None)
        return states

    def keep_only(self, wanted: set[Key]) -> None:
        """A reload: the saved states of checks no longer configured are deleted."""
        self._restored_firing = {k for k in self._restored_firing if k[:2] in wanted}
        for key in [key for key in self._saved if key not in wanted]:
            self._delete_now(key)

    async def save(self, key: Key, state: CheckState, policy: Policy, at: float) -> None:
        """Write the check's state if it differs from what was last written. A failed
        write is logged and retried at the next evaluation; it never stops one."""
        # Past blind_after, more errors change nothing the state machine looks at; without
        # the cap every check would be written at every evaluation of an outage.
        stored = replace(state, error_count=min(state.error_count, policy.blind_after))
        text = encode(stored)
        if self._saved.get(key, _BLANK_STATE) == text or not self.may_save(key[0]):
            return
        writer = writer_for(self.store)
        try:
            if text == _BLANK_STATE:
                await writer.delete_check_state(*key)
            else:
                await writer.save_check_state(*key, text, at)
        except StoreError as exc:
            log.critical(
                "check state not saved: after a restart now the check would start over",
                service=key[0],
                check=key[1],
                error=str(exc),
            )
            return
        if text == _BLANK_STATE:
            self._saved.pop(key, None)
        else:
            self._saved[key] = text

    def _delete_now(self, key: Key) -> None:
        # On the calling thread, not the writer's: only at start (before the loop serves
        # anything) and at a reload (already a synchronous step on the loop: the config
        # is read and parsed there too), for a handful of rows, once; and whoever started
        # or reloaded reads the store right after.
        try:
            self.store.delete_check_state(*key)
        except StoreError as exc:
            # Harmless meanwhile: a row of a check not configured is never restored, and
            # the next start or reload deletes it.
            log.critical(
                "saved state of a removed check not deleted",
                service=key[0],
                check=key[1],
                error=str(exc),
            )
            return
        self._saved.pop(key, None)

    def restored_breaching(
        self, key: Key, state: CheckState, policy: Policy
    ) -> list[tuple[Labels, SeriesState]]:
        """The check's series restored firing that this evaluation (its new ``state``)
        shows breaching: each once, the first time. A series that stopped firing without
        being seen breaching is forgotten; one in a gap is kept for later."""
        found: list[tuple[Labels, SeriesState]] = []
        if not self._restored_firing:
            return found
        for entry in sorted(k for k in self._restored_firing if k[:2] == key):
            series = state.series.get(entry[2])
            if series is None or series.phase is not Phase.FIRING:
                self._restored_firing.discard(entry)  # over without being seen breaching
                continue
            verdict = series.last_verdict
            if verdict is None or policy.effective(verdict) is not Verdict.BREACH:
                continue  # a gap: no evidence yet that it still breaches
            self._restored_firing.discard(entry)
            found.append((entry[2], series))
        return found


__all__ = ["CheckStateKeeper", "Key", "configured"]


def stored_states(store: StateStore, services: Collection[str]) -> dict[Key, CheckState]:
    """The saved check states of ``services``, read in one pass; an unreadable row is left
    out (its holder logs it and starts that check over)."""
    states: dict[Key, CheckState] = {}
    for key, row in store.check_states().items():
        if key[0] not in services:
            continue
        try:
            states[key] = decode(row.state)
        except StateFormatError:
            continue
    return states
