"""The one stage between the event bus and the notifiers: routing, queues, retries, metrics.

A rollback never waits for a notification. The bus calls :meth:`Dispatcher.on_event`
synchronously, in the middle of the pipeline; it only builds the message and puts it into
each interested notifier's bounded queue, without awaiting anything. Each notifier has its
own worker task and queue, so a notifier that hangs (a peer that accepts a connection and
never answers) delays only itself. When a queue is full the oldest message in it is
dropped and counted: the newest news is the one worth keeping.

A worker delivers one message at a time, in the order published, so a PagerDuty resolve
never overtakes the trigger it resolves, even while that trigger is retried. Each attempt
is bounded by a timeout. A failure the notifier marks transient (timeout, connection
error, 429, 5xx, SMTP 4xx) is retried with exponential backoff and jitter, or after the
peer's ``Retry-After``, for at most ``RetryPolicy.attempts`` attempts and
``RetryPolicy.deadline`` seconds; any other failure ends the delivery at once.

Metrics (on the registry passed in)::

    rollbackd_notifications_total{notifier, outcome}          sent | failed
    rollbackd_notification_failures_total{notifier, reason}   final failures, by reason
    rollbackd_notification_retries_total{notifier, reason}    attempts that were retried
    rollbackd_notifications_dropped_total{notifier}           queue full: oldest dropped
    rollbackd_notification_queue_length{notifier}             waiting, not yet attempted
    rollbackd_notifier_ready{notifier}                        0 when it could not be built

Every log line about a notifier passes through that notifier's redactor.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from rollbackd.config.secrets import SecretError
from rollbackd.core.model import Event
from rollbackd.logs import get_logger
from rollbackd.notify.base import (
    BuildContext,
    DeliveryError,
    NotifierSpec,
    Sender,
    default_http_client,
)
from rollbackd.notify.content import Message, build_message, fallback_message


class EventSource(Protocol):
    """What the dispatcher subscribes to: the event bus (``runtime/bus.py``)."""

    def subscribe(self, subscriber: Callable[[Event], None]) -> None: ...


log = get_logger("rollbackd.notify")

OUTCOMES = ("sent", "failed")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    """Attempts per message, the first included."""
    backoff: float = 1.0
    """Seconds before the first retry; each further one waits about twice as long."""
    max_backoff: float = 60.0
    deadline: float = 600.0
    """Seconds after the first attempt when no further attempt starts."""
    attempt_timeout: float = 15.0
    """Seconds one attempt may take: connecting, sending, reading the answer."""


@dataclass
class _Route:
    spec: NotifierSpec
    sender: Sender
    queue: asyncio.Queue[Message]
    in_flight: Message | None = None
    worker: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def wants(self, event: Event) -> bool:
        return self.spec.wants(event.type, event.service or "") and self.sender.accepts(event.type)


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notifications = Counter(
            "rollbackd_notifications_total",
            "Notifications that left the queue, by outcome (sent or failed for good).",
            ["notifier", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "rollbackd_notification_failures_total",
            "Notifications given up on, by the reason of the last attempt.",
            ["notifier", "reason"],
            registry=registry,
        )
        self.retries = Counter(
            "rollbackd_notification_retries_total",
            "Failed attempts that were tried again, by reason.",
            ["notifier", "reason"],
            registry=registry,
        )
        self.dropped = Counter(
            "rollbackd_notifications_dropped_total",
            "Notifications dropped because the notifier's queue was full.",
            ["notifier"],
            registry=registry,
        )
        self.queue_length = Gauge(
            "rollbackd_notification_queue_length",
            "Notifications waiting in the notifier's queue.",
            ["notifier"],
            registry=registry,
        )
        self.ready = Gauge(
            "rollbackd_notifier_ready",
            "1 when the notifier was built (its secrets read), 0 when it is disabled.",
            ["notifier"],
            registry=registry,
        )


class Dispatcher:
    """Routes bus events to notifiers. Build it, :meth:`subscribe` it to the bus, then
    :meth:`start` it inside the running loop; :meth:`stop` before the loop ends.

    Events published before :meth:`start` wait in the queues and go out once it runs.
    A notifier whose secret cannot be read is disabled, logged, listed in
    :attr:`problems` and exported as ``rollbackd_notifier_ready 0``: notifications must
    never stop the daemon from rolling back.
    """

    def __init__(
        self,
        specs: Sequence[NotifierSpec],
        *,
        prometheus_url: str | None = None,
        public_url: str | None = None,
        metrics_registry: CollectorRegistry | None = None,
        queue_size: int = 1000,
        retry: RetryPolicy | None = None,
        http_client: Callable[[float], httpx.AsyncClient] = default_http_client,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got: {queue_size}")
        self.retry = retry or RetryPolicy()
        self.queue_size = queue_size
        self._prometheus_url = prometheus_url
        self._public_url = public_url
        self._http_client = http_client
        self._metrics = _Metrics(metrics_registry or CollectorRegistry())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._stopped = False
        self._retiring: dict[asyncio.Task[None], _Route] = {}
        self._labelled: set[str] = set()
        """Notifier names with metric children, built or disabled."""
        self.problems: list[str] = []
        self._routes: list[_Route] = self._build(specs)

    # -- lifecycle ------------------------------------------------------------------

    def subscribe(self, bus: EventSource) -> None:
        bus.subscribe(self.on_event)

    def start(self) -> None:
        """Start one worker per notifier. Call from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopped = False
        for route in self._routes:
            self._start_worker(route)

    async def stop(self, timeout: float = 5.0) -> None:
        """Give queued notifications up to ``timeout`` seconds to go out, then cancel what
        is left and close the connections."""
        self._stopped = True
        routes = list(self._routes)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(r.queue.join() for r in routes if r.worker))
        except TimeoutError:
            left = {r.name: self.backlog(r.name) for r in routes if self.backlog(r.name)}
            log.warning("stopping with notifications undelivered", undelivered=left)
        for route in routes:
            await self._close(route)
        for task, route in list(self._retiring.items()):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self._close(route)

    def reload(
        self,
        specs: Sequence[NotifierSpec],
        *,
        prometheus_url: str | None,
        public_url: str | None,
    ) -> None:
        """Take a reloaded config. New events go to notifiers built from ``specs``, their
        secrets read again (so a rotated secret file takes effect); the old notifiers
        deliver what they already queued, for up to ``RetryPolicy.deadline`` seconds, then
        close. Call from the event loop (a SIGHUP handler runs there)."""
        self._prometheus_url = prometheus_url
        self._public_url = public_url
        self.problems = []
        before = set(self._labelled)
        self._labelled.clear()
        routes = self._build(specs)
        old, self._routes = self._routes, routes
        for name in before - self._labelled:
            # A removed notifier's gauges would otherwise report it forever.
            for gauge in (self._metrics.ready, self._metrics.queue_length):
                with contextlib.suppress(KeyError):
                    gauge.remove(name)
        if self._loop is None:
            return  # not started: the old queues were never worked, nothing to drain
        for route in routes:
            self._start_worker(route)
        for route in old:
            task = asyncio.ensure_future(self._retire(route))
            self._retiring[task] = route
            task.add_done_callback(self._forget_retired)

    # -- intake: called by the bus, must never block ---------------------------------

    def on_event(self, event: Event) -> None:
        """The bus subscriber: routes ``event`` to every interested notifier's queue."""
        if self._stopped:
            return
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            # asyncio queues belong to their loop's thread.
            loop.call_soon_threadsafe(self._route, event)
            return
        self._route(event)

    def _route(self, event: Event) -> None:
        routes = [r for r in self._routes if r.wants(event)]
        if not routes:
            return
        try:
            message = build_message(
                event, prometheus_url=self._prometheus_url, public_url=self._public_url
            )
        except Exception:  # a content bug must not cost the notification
            log.exception("cannot word the notification; sending a bare one", event_type=event.type)
            message = fallback_message(event)
        for route in routes:
            self._offer(route, message)

    def _offer(self, route: _Route, message: Message) -> None:
        try:
            route.queue.put_nowait(message)
            return
        except asyncio.QueueFull:
            pass
        dropped = route.queue.get_nowait()
        route.queue.task_done()
        route.queue.put_nowait(message)
        self._metrics.dropped.labels(route.name).inc()
        log.warning(
            "notification queue full: dropped the oldest",
            notifier=route.name,
            dropped=dropped.type,
            dropped_service=dropped.service,
            queue_size=self.queue_size,
        )

    # -- delivery ---------------------------------------------------------------------

    async def _work(self, route: _Route) -> None:
        while True:
            message = await route.queue.get()
            route.in_flight = message
            try:
                await self._deliver(route, message)
            except asyncio.CancelledError:
                raise
            except Exception:  # the worker must outlive any bug in one delivery
                log.error(
                    "notification worker error",
                    notifier=route.name,
                    traceback=route.sender.redact(traceback.format_exc()),
                )
            finally:
                route.in_flight = None
                route.queue.task_done()

    async def _deliver(self, route: _Route, message: Message) -> None:
        policy = self.retry
        sender = route.sender
        redact = sender.redact
        attempts = 0
        started = time.monotonic()

        async def attempt() -> None:
            nonlocal attempts
            attempts += 1
            try:
                async with asyncio.timeout(policy.attempt_timeout):
                    await sender.send(message)
            except DeliveryError:
                raise
            except TimeoutError:
                raise sender.error(
                    "timeout", f"no answer within {policy.attempt_timeout:g}s", retry=True
                ) from None
            except Exception as exc:  # a notifier bug: counted, logged, not retried
                log.error(
                    "notifier failed unexpectedly",
                    notifier=route.name,
                    traceback=redact(traceback.format_exc()),
                )
                raise sender.error("error", f"{type(exc).__name__}: {exc}", retry=False) from None

        def before_sleep(state: RetryCallState) -> None:
            error = _error_of(state)
            reason = error.reason if error else "error"
            self._metrics.retries.labels(route.name, reason).inc()
            log.info(
                "notification attempt failed; retrying",
                notifier=route.name,
                event_type=message.type,
                service=message.service,
                attempt=state.attempt_number,
                reason=reason,
                error=redact(str(error)) if error else None,
                retry_in=round(state.upcoming_sleep, 3),
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts) | stop_before_delay(policy.deadline),
            wait=_wait(policy),
            retry=retry_if_exception(lambda exc: isinstance(exc, DeliveryError) and exc.retry),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            await retrying(attempt)
        except DeliveryError as exc:
            self._metrics.notifications.labels(route.name, "failed").inc()
            self._metrics.failures.labels(route.name, exc.reason).inc()
            log.warning(
                "notification failed",
                notifier=route.name,
                type=sender.type,
                event_type=message.type,
                service=message.service,
                rollback_id=message.rollback_id,
                reason=exc.reason,
                error=redact(str(exc)),
                attempts=attempts,
                retryable=exc.retry,
                seconds=round(time.monotonic() - started, 3),
            )
            return
        self._metrics.notifications.labels(route.name, "sent").inc()
        log.debug(
            "notification sent",
            notifier=route.name,
            event_type=message.type,
            service=message.service,
            attempts=attempts,
        )

    # -- introspection ----------------------------------------------------------------

    @property
    def notifiers(self) -> list[str]:
        return [r.name for r in self._routes]

    def backlog(self, name: str) -> int:
        """Messages for notifier ``name`` not yet delivered or given up: queued plus the
        one being attempted."""
        for route in self._routes:
            if route.name == name:
                return route.queue.qsize() + (1 if route.in_flight is not None else 0)
        raise KeyError(name)

    async def wait_idle(self) -> None:
        """Until every queue is empty and nothing is being attempted (tests)."""
        await asyncio.gather(*(r.queue.join() for r in self._routes))

    # -- helpers ----------------------------------------------------------------------

    def _build(self, specs: Iterable[NotifierSpec]) -> list[_Route]:
        context = BuildContext(
            prometheus_url=self._prometheus_url,
            public_url=self._public_url,
            timeout=self.retry.attempt_timeout,
            http_client=self._http_client,
        )
        routes = []
        for spec in specs:
            self._labelled.add(spec.name)
            try:
                sender = spec.build(context)
            except SecretError as exc:
                self.problems.append(f"notify {spec.name}: disabled: {exc}")
                self._metrics.ready.labels(spec.name).set(0)
                log.error(
                    "notifier disabled: its secret cannot be read",
                    notifier=spec.name,
                    error=str(exc),
                )
                continue
            queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=self.queue_size)
            route = _Route(spec, sender, queue)
            routes.append(route)
            m = self._metrics
            m.ready.labels(spec.name).set(1)
            m.queue_length.labels(spec.name).set_function(queue.qsize)
            m.dropped.labels(spec.name)
            for outcome in OUTCOMES:
                m.notifications.labels(spec.name, outcome)
        return routes

    def _start_worker(self, route: _Route) -> None:
        if route.worker is None:
            route.worker = asyncio.ensure_future(self._work(route))

    def _forget_retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    async def _retire(self, route: _Route) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.retry.deadline):
                await route.queue.join()
        await self._close(route)

    async def _close(self, route: _Route) -> None:
        if route.worker is not None:
            route.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await route.worker
            route.worker = None
        try:
            await route.sender.aclose()
        except Exception as exc:
            log.warning(
                "closing notifier failed",
                notifier=route.name,
                error=route.sender.redact(f"{type(exc).__name__}: {exc}"),
            )


def _error_of(state: RetryCallState) -> DeliveryError | None:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None and outcome.failed else None
    return error if isinstance(error, DeliveryError) else None


def _wait(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    # Jitter spreads the retries of many events failing at once (a peer coming back).
    backoff = wait_exponential(multiplier=policy.backoff, max=policy.max_backoff) + wait_random(
        0, policy.backoff
    )

    def wait(state: RetryCallState) -> float:
        seconds = backoff(state)
        error = _error_of(state)
        if error is not None and error.retry_after is not None:
            # The peer said when; waiting less only earns another 429.
            seconds = max(seconds, min(error.retry_after, policy.max_backoff))
        return seconds

    return wait


__all__ = ["Dispatcher", "RetryPolicy"]
