"""The daemon as the HTTP API and the Alertmanager receiver see it: one facade.

The API and the alert receiver talk to a ``Control`` only, never to the engine, the
pipeline or the store, so what they may read and change is listed in this one place.
It holds no state of its own (but one lock: alerts are handed to the pipeline one batch
at a time, whoever hands them over): every call delegates to the pipeline, the engine, the
store or the bus. Writes go through the store's writer thread (``writer_for``) and the bus
(``publish``); reads run in a worker thread. Either way no call waits for the store on the
event loop.

With several daemons on one PostgreSQL, a request only a service's holder may carry out
(approve, reject, a manual rollback, a release) that reaches a daemon that does not hold
the service is handed to the holder (``asker``, ``runtime/relay.py``) and answered as if
done here.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import CollectorRegistry

from rollbackd.config.loader import LoadedConfig, Service
from rollbackd.core.check_state import CheckState
from rollbackd.core.model import (
    AlertDraft,
    HandoffDraft,
    HandoffKind,
    JSONValue,
    Rollback,
    RollbackState,
    ServiceState,
    Step,
    StoredAlert,
    VersionRecord,
)
from rollbackd.core.model import Trigger as JoinedTrigger
from rollbackd.runtime import handoff_desk as desk
from rollbackd.runtime.bake_evidence import BakeStatus
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.holdings import Holdings as Holdings
from rollbackd.runtime.holdings import read_holdings
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.relay import Asker
from rollbackd.runtime.tenancy import NotHolder
from rollbackd.runtime.triggers import Submission, Trigger
from rollbackd.runtime.versions import VersionObservation
from rollbackd.store.errors import ConflictError, FencedError
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import StoreWriter, writer_for

TRIGGERS_SHOWN = 100
"""Joined triggers read per rollback; the rest are only counted (``triggers_total``)."""
IN_FLIGHT = (RollbackState.PENDING, RollbackState.RUNNING, RollbackState.VERIFYING)
"""The states of a rollback ``status`` lists as in flight."""
IN_FLIGHT_SHOWN = 1000


@dataclass(frozen=True)
class RollbackDetail:
    """A rollback with what is shown beside it: its steps and the triggers it joined."""

    rollback: Rollback
    steps: Sequence[Step]
    triggers: Sequence[JoinedTrigger]
    """The first ``TRIGGERS_SHOWN``, oldest first."""
    triggers_total: int


@dataclass(frozen=True)
class StatusReads:
    """What ``status`` shows from the store, read in one worker-thread call."""

    paused: frozenset[str]
    """The paused scopes: service names, and ``*`` when everything is paused."""
    states: Mapping[str, ServiceState | None]
    last_known_good: Mapping[str, str | None]
    records: Mapping[str, VersionRecord]
    """The record of each service's current version, for the services that have one."""
    in_flight: Sequence[RollbackDetail]


@dataclass(frozen=True)
class StoreHealth:
    """Whether the state store takes writes now, for /readyz."""

    location: str
    writable: bool
    failure: str | None
    """Why the last write failed, if it did."""


@dataclass(frozen=True)
class Resumed:
    """What resuming a scope did."""

    paused: frozenset[str]
    """The scopes still paused afterwards."""
    thawed: str | None
    """Why the service was frozen, when this resume thawed it; None when it was not."""


class Control:
    """The one object the API and the alert receiver talk to (see the module's doc)."""

    def __init__(self, pipeline: Pipeline, *, asker: Asker | None = None) -> None:
        """``asker``: how requests reach the holder of a service another daemon holds;
        None when this daemon is alone (it holds every service)."""
        self._pipeline = pipeline
        self._asker = asker
        self.alert_hand_over = asyncio.Lock()
        """Held while alerts are handed to the pipeline: two deliveries of one alert (two
        routes with continue), or a delivery and the relay, must not both see it unhandled
        and both hand it over."""

    # Properties, not attributes: a reload replaces the engine's config, and tests swap
    # the pipeline's methods; a facade must see what is in force at each call.
    @property
    def _engine(self) -> Engine:
        return self._pipeline.engine

    @property
    def _store(self) -> StateStore:
        return self._pipeline.store

    @property
    def _writer(self) -> StoreWriter:
        return writer_for(self._pipeline.store)

    # -- what the daemon runs with ---------------------------------------------------------

    @property
    def loaded(self) -> LoadedConfig:
        """The config and services in force (a reload replaces them)."""
        return self._engine.loaded

    @property
    def services(self) -> Mapping[str, Service]:
        return self._engine.loaded.services

    @property
    def registry(self) -> CollectorRegistry:
        """The daemon's metrics registry, served on /metrics."""
        return self._engine.metrics.registry

    @property
    def state_dir(self) -> Path:
        """The directory of the state store, where the daemon's runtime files go."""
        return self._engine.loaded.state_dir

    def prometheus_probe(self, timeout: float) -> Callable[[], Awaitable[bool]]:
        """A probe of Prometheus's /-/ready through the client in use now. It keeps that
        client: a reload that replaces the client is not seen by it, as before the API
        talked to this facade."""
        return functools.partial(self._engine.client.aready, timeout=timeout)

    async def store_health(self) -> StoreHealth:
        writable = await asyncio.to_thread(self._store.writable, 1.0)
        return StoreHealth(self._store.location, writable, self._store.write_failure)

    # -- reads -----------------------------------------------------------------------------

    async def status_reads(self, names: Sequence[str]) -> StatusReads:
        """The stored state of the services ``names`` and the rollbacks in flight."""
        return await asyncio.to_thread(self._status_reads, names)

    def _status_reads(self, names: Sequence[str]) -> StatusReads:
        store = self._store
        paused = frozenset(store.paused())
        states = {n: store.service_state(n) for n in names}
        good = {n: self._engine.versions.last_known_good(n) for n in names}
        live = store.rollbacks(states=list(IN_FLIGHT), limit=IN_FLIGHT_SHOWN)
        records = {
            n: record
            for n, s in states.items()
            if s is not None
            and s.current_version is not None
            and (record := store.version(n, s.current_version)) is not None
        }
        return StatusReads(paused, states, good, records, [self._detail(r) for r in live])

    async def leases(self, names: Sequence[str]) -> Holdings:
        """Who holds each of ``names`` (live leases, this daemon's member name) and, for
        those another daemon holds, the check states it saved; empty alone (SQLite)."""
        return await read_holdings(self._store, self._pipeline.tenancy, names)

    def check_state(self, service: str, check: str) -> CheckState:
        return self._engine.check_state(service, check)

    def canary_active(self, service: str) -> bool:
        return self._engine.canary_active(service)

    def check_evidence(self, service: str, check: str) -> str | None:
        """A ``compare`` check's evidence at its last evaluation by this daemon."""
        return self._engine.evidence(service, check)

    def bake_status(
        self,
        service: Service,
        state: ServiceState | None,
        record: VersionRecord | None,
        now: float,
    ) -> BakeStatus:
        """Why the service's current version has (not) baked."""
        return self._engine.bake_status(
            service,
            state.current_version if state else None,
            record.baked_at if record else None,
            (record.bad_reason or "rolled back") if record and record.bad else None,
            state.healthy_since if state else None,
            now,
        )

    async def history(
        self, service: str | None, state: RollbackState | None, limit: int
    ) -> list[RollbackDetail]:
        """Rollbacks, the latest first."""

        def read() -> list[RollbackDetail]:
            found = self._store.rollbacks(
                service=service, states=None if state is None else [state], limit=limit
            )
            return [self._detail(r) for r in found]

        return await asyncio.to_thread(read)

    async def rollback(self, rollback_id: int) -> RollbackDetail | None:
        def read() -> RollbackDetail | None:
            found = self._store.rollback(rollback_id)
            return None if found is None else self._detail(found)

        return await asyncio.to_thread(read)

    async def detail(self, rollback: Rollback) -> RollbackDetail:
        return await asyncio.to_thread(self._detail, rollback)

    def _detail(self, rollback: Rollback) -> RollbackDetail:
        store = self._store
        return RollbackDetail(
            rollback=rollback,
            steps=store.steps(rollback.id),
            triggers=store.triggers(rollback.id, limit=TRIGGERS_SHOWN),
            triggers_total=store.count_triggers(rollback.id),
        )

    async def alerts(self, service: str | None, limit: int) -> list[StoredAlert]:
        """Alerts received from Alertmanager, the latest first."""
        return await asyncio.to_thread(self._store.alerts, service, None, limit)

    # -- rollbacks -------------------------------------------------------------------------

    async def submit(self, trigger: Trigger) -> Submission:
        """Hand a trigger to this daemon's pipeline (raises UnknownService); ``not_holder``
        when another daemon holds the service."""
        return await self._pipeline.submit(trigger)

    async def request(self, trigger: Trigger) -> Submission:
        """A person's rollback request: decided by the service's holder, wherever it is
        (raises UnknownService)."""
        submission = await self._pipeline.submit(trigger)
        if submission.outcome != "not_holder" or self._asker is None:
            return submission
        answer = await self._ask(trigger.service, HandoffKind.ROLLBACK, desk.rollback_body(trigger))
        handed, rollback_id = desk.answered_submission(answer)
        rollback = None
        if rollback_id is not None:
            rollback = await asyncio.to_thread(self._store.rollback, rollback_id)
        return replace(handed, rollback=rollback)

    async def approve(self, rollback_id: int, who: str) -> Rollback:
        """Raises LookupError for an unknown rollback, ConflictError for one not pending
        (or whose holder could not be asked)."""
        done = await self._decided_here(self._pipeline.approve(rollback_id, who))
        if done is not None:
            return done
        body = desk.approve_body(rollback_id, who)
        return await self._decided_by_holder(rollback_id, HandoffKind.APPROVE, body)

    async def reject(self, rollback_id: int, who: str, reason: str) -> Rollback:
        """Raises LookupError for an unknown rollback, ConflictError for one not pending
        (or whose holder could not be asked)."""
        done = await self._decided_here(self._pipeline.reject(rollback_id, who, reason))
        if done is not None:
            return done
        body = desk.reject_body(rollback_id, who, reason)
        return await self._decided_by_holder(rollback_id, HandoffKind.REJECT, body)

    async def _decided_here(self, decision: Awaitable[Rollback]) -> Rollback | None:
        """A person's decision as this daemon's pipeline made it; None when another daemon
        holds the service (or took it over just now) and can be asked. Without a way to
        ask, that is a refusal (409, with why), never a failure of the store (503)."""
        try:
            return await decision
        except NotHolder as exc:
            if self._asker is None:
                raise ConflictError(f"{exc}: ask the daemon that holds it") from exc
        except FencedError as exc:
            if self._asker is None:
                raise ConflictError(f"not decided here: {exc}") from exc
        return None

    async def _decided_by_holder(
        self, rollback_id: int, kind: HandoffKind, body: Mapping[str, JSONValue]
    ) -> Rollback:
        service = (await self._rollback_named(rollback_id)).service
        answer = await self._ask(service, kind, body)
        return await self._rollback_named(desk.answered_rollback_id(answer))

    async def _ask(
        self, service: str, kind: HandoffKind, body: Mapping[str, JSONValue]
    ) -> desk.Answer:
        assert self._asker is not None
        draft = HandoffDraft(service, kind, body, self._asker.member)
        return await self._asker.ask(draft)

    async def _rollback_named(self, rollback_id: int) -> Rollback:
        found = await asyncio.to_thread(self._store.rollback, rollback_id)
        if found is None:
            raise LookupError(f"no rollback {rollback_id}")
        return found

    # -- automation ------------------------------------------------------------------------

    async def pause(self, scope: str, who: str, now: float) -> frozenset[str]:
        """Stop automatic rollbacks of a service, or of all (``*``); the paused scopes."""
        await self._writer.set_pause(scope, True, now, who)
        await self._engine.bus.publish(
            "service.paused", now, _service_of(scope), data={"scope": scope, "by": who}
        )
        return frozenset(await asyncio.to_thread(self._store.paused))

    async def resume(self, scope: str, who: str, now: float) -> Resumed:
        """Restart automatic rollbacks; for one service, also thaw it when it was frozen."""
        await self._writer.set_pause(scope, False, now, who)
        state = None if scope == "*" else await asyncio.to_thread(self._store.service_state, scope)
        thawed = None
        if state is not None and state.frozen:
            thawed = state.frozen_reason or "no reason recorded"
            await self._writer.set_frozen(scope, False)
        paused = frozenset(await asyncio.to_thread(self._store.paused))
        data: dict[str, JSONValue] = {"scope": scope, "by": who}
        if thawed is not None:
            data["thawed"] = thawed
        await self._engine.bus.publish("service.resumed", now, _service_of(scope), data=data)
        return Resumed(paused, thawed)

    # -- releases --------------------------------------------------------------------------

    async def release(
        self, service: str, version: str, meta: Mapping[str, str], now: float
    ) -> VersionObservation:
        """Record a release from CI (raises ValueError for an invalid version). CI vouches
        for a version with the meta ``known_good = "true"``. Recorded by the service's
        holder: its version watch keeps the service's current version."""
        if self._asker is not None and not self._pipeline.tenancy.may_act(service):
            body = desk.release_body(version, meta, now)
            return desk.answered_observation(await self._ask(service, HandoffKind.RELEASE, body))
        return await self._engine.record_release(
            service, version, now, meta, known_good=meta.get("known_good") == "true"
        )

    # -- alert intake ----------------------------------------------------------------------

    async def record_alerts(
        self, drafts: Sequence[AlertDraft], now: float
    ) -> list[tuple[StoredAlert, bool]]:
        """StateStore a delivery's alerts; each with whether it is new (raises StoreError)."""
        return await self._writer.record_alerts(drafts, now)

    async def set_alert_handled(
        self, alert_id: int, now: float, outcome: str, rollback_id: int | None
    ) -> None:
        await self._writer.set_alert_handled(alert_id, now, outcome, rollback_id)

    async def unhandled_alerts(self, services: Sequence[str]) -> list[StoredAlert]:
        """Alerts of ``services`` stored but not yet handed to a pipeline."""
        return await asyncio.to_thread(self._store.unhandled_alerts, services)


def _service_of(scope: str) -> str | None:
    return None if scope == "*" else scope
