"""``rollbackd run``: the daemon's lifecycle.

Start: load and validate everything, open the store, recover rollbacks a crash left in
flight, schedule the checks, then tell systemd READY=1 (and keep pinging its watchdog from
the event loop, so a blocked loop gets the daemon restarted).

SIGHUP: RELOADING=1; parse and validate the new config and rules first; when valid, swap
them in (unchanged checks keep their state and timing), else keep the old ones running and
say so (log, ``config.reload_failed`` event, ``rollbackd_config_last_reload_successful``
0); then READY=1.

SIGTERM / SIGINT: STOPPING=1; stop scheduling; let a running rollback finish within
``[daemon] stop_grace``, else stop it and mark it interrupted; close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import sys
import time
from pathlib import Path

from rollbackd.api.server import ApiServer, ApiStartError, start_api
from rollbackd.config.loader import ConfigError, LoadedConfig, load
from rollbackd.config.secrets import SecretError, read_secret
from rollbackd.core.model import RollbackState
from rollbackd.logs import configure, get_logger
from rollbackd.notify.dispatcher import Dispatcher
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.alert_intake import hand_over_waiting
from rollbackd.runtime.control import Control
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.handoff_desk import HandoffDesk
from rollbackd.runtime.leases import LeaseKeeper, default_member
from rollbackd.runtime.metrics import Metrics
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.relay import Asker, Relay, Wakeups
from rollbackd.runtime.runner import Runner
from rollbackd.runtime.scheduler import Scheduler
from rollbackd.runtime.sdnotify import SystemdNotifier
from rollbackd.runtime.tenancy import SoloTenancy, Tenancy
from rollbackd.store.errors import MemberTakenError, StoreError
from rollbackd.store.interfaces import Listening, StateStore
from rollbackd.store.postgres import PostgresStore
from rollbackd.store.sqlite import Store
from rollbackd.store.writer import writer_for

log = get_logger("rollbackd.daemon")

STATE_FILE = "state.db"


def open_store(loaded: LoadedConfig) -> StateStore:
    """PostgreSQL when the config has a ``[store]``, else SQLite under ``state_dir``
    (which also holds ``api.address`` in both cases)."""
    state_dir = loaded.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    section = loaded.config.store
    if section is None:
        return Store(state_dir / STATE_FILE)
    password = None
    if section.password_file is not None or section.password_env is not None:
        try:
            password = read_secret(section.password_file, section.password_env, "[store] password")
        except SecretError as exc:
            # A store that cannot be opened: the daemon refuses to start, and says why.
            raise StoreError(str(exc)) from None
    return PostgresStore(section.url, password=password)


class Daemon:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.loaded = load(config_path)
        self.metrics = Metrics()
        self.store = open_store(self.loaded)
        self.client = PrometheusClient(self.loaded.config.prometheus)
        self.engine = Engine(self.loaded, self.client, self.store, metrics=self.metrics)
        self.keeper = self._lease_keeper()
        self.tenancy: Tenancy = SoloTenancy() if self.keeper is None else self.keeper
        # Check states are the holder's to save: one that evaluates a lapsed lease does not.
        self.engine.keeper.may_save = self.tenancy.may_act
        if self.keeper is not None:
            # Thousands of evaluations must not each wait on a database round trip for the
            # current version; a service taken over is read again.
            self.engine.versions.keep_current_in_memory()
            self.keeper.on_acquired = self.engine.take_over
        self.pipeline = Pipeline(self.engine, tenancy=self.tenancy)
        # The one place evaluation meets decision: what fires goes to the pipeline, and
        # only for the services this daemon may act on (all of them, alone on SQLite).
        self.runner = Runner(self.engine, self.pipeline.on_fire, tenancy=self.tenancy)
        config = self.loaded.config
        self.dispatcher = Dispatcher(
            config.notify,
            prometheus_url=config.prometheus.url,
            public_url=config.server.public_url,
            metrics_registry=self.metrics.registry,
        )
        self.dispatcher.subscribe(self.engine.bus)
        self.scheduler = Scheduler(self.runner)
        self.wakeups = Wakeups()
        self.control = self._control()
        self.relay = self._relay()
        self.systemd = SystemdNotifier()
        self.api: ApiServer | None = None
        self._stop = asyncio.Event()
        self._background_stop = asyncio.Event()
        """Ends the lease keeper's and the relay's loops (at shutdown)."""
        self._keeper_task: asyncio.Task[None] | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._listening: Listening | None = None
        self._reloads: set[asyncio.Task[bool]] = set()
        self.metrics.config_reload_ok.set(1)
        self.metrics.config_reload_time.set(time.time())

    def _lease_keeper(self) -> LeaseKeeper | None:
        """Leases only when several daemons may share the store: PostgreSQL. On SQLite the
        daemon is alone and holds everything (``SoloTenancy``): no keeper, no lease writes."""
        section = self.loaded.config.store
        if section is None:
            return None
        return LeaseKeeper(
            self.store,
            section.member or default_member(),
            section.lease_time.total_seconds(),
            lambda: list(self.engine.loaded.services),
            metrics=self.metrics,
        )

    def _control(self) -> Control:
        """The facade the API talks to; with leases, it hands what another daemon must do
        to that daemon."""
        if self.keeper is None:
            return Control(self.pipeline)
        return Control(self.pipeline, asker=Asker(self.store, self.keeper.member, self.wakeups))

    def _relay(self) -> Relay | None:
        """With leases: the alerts and requests other daemons took for the services this
        one holds, carried out here."""
        if self.keeper is None:
            return None
        control = self.control
        return Relay(
            self.store,
            self.keeper,
            HandoffDesk(self.pipeline),
            functools.partial(hand_over_waiting, control),
            self.wakeups,
        )

    async def _start_relay(self) -> None:
        relay = self.relay
        if relay is None:
            return
        self.wakeups.bind(asyncio.get_running_loop())
        self._listening = self.store.listen(self.wakeups.wake)
        self._relay_task = asyncio.ensure_future(relay.run(self._background_stop))

    async def _stop_relay(self) -> None:
        task = self._relay_task
        if task is not None:
            self._background_stop.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout=10.0)
        if self._listening is not None:
            await asyncio.to_thread(self._listening.close)

    async def _start_leases(self) -> None:
        """One tick before anything is scheduled (the first evaluations find this daemon's
        share already held), then a tick every third of the lease time."""
        keeper = self.keeper
        if keeper is None:
            return
        await keeper.start()  # MemberTakenError: another daemon runs as this member
        log.info("leases", member=keeper.member, held=len(keeper.held()))
        self._keeper_task = asyncio.ensure_future(keeper.run(self._background_stop))

    async def _stop_leases(self) -> None:
        """Give the leases back (a clean stop hands over at once). Bounded: with the
        database unreachable they lapse by themselves."""
        keeper, task = self.keeper, self._keeper_task
        if keeper is None or task is None:
            return
        self._background_stop.set()
        try:
            await asyncio.wait_for(task, timeout=keeper.lease_time)
        except TimeoutError:
            log.warning("leases not given back in time: they expire by themselves")
        finally:
            keeper.close()

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self.reload())
        self._reloads.add(task)  # referenced until done: the loop keeps only weak ones
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> bool:
        """Load the config and rules again; keep the running ones unless the new are valid."""
        self.systemd.reloading()
        try:
            try:
                loaded = load(self.config_path)
            except ConfigError as exc:
                problems = [str(p) for p in exc.problems]
                log.error("reload failed: keeping the running config", problems=problems)
                self.metrics.config_reload_ok.set(0)
                await self.engine.bus.publish(
                    "config.reload_failed",
                    time.time(),
                    data={"config": str(self.config_path), "problems": problems},
                )
                return False
            if loaded.config.prometheus != self.loaded.config.prometheus:
                self.client = PrometheusClient(loaded.config.prometheus)
                self.engine.client = self.client
            if loaded.config.server != self.loaded.config.server:
                log.warning("[server] changes take effect at the next restart")
            self.loaded = loaded
            self.scheduler.reload(loaded)
            # Always, so rotated secret files take effect.
            self.dispatcher.reload(
                loaded.config.notify,
                prometheus_url=loaded.config.prometheus.url,
                public_url=loaded.config.server.public_url,
            )
            self.metrics.config_reload_ok.set(1)
            self.metrics.config_reload_time.set(time.time())
            log.info("reloaded", services=len(loaded.services))
            return True
        finally:
            self.systemd.ready(self.status_line())

    def stop(self) -> None:
        self._stop.set()

    def status_line(self) -> str:
        services = self.engine.loaded.services.values()
        checks = sum(len(s.rules.check) for s in services)
        firing = sum(1 for state in self.engine.states.values() if state.firing)
        try:
            in_flight = self.store.rollbacks(
                states=[RollbackState.RUNNING, RollbackState.VERIFYING], limit=100
            )
        except StoreError:
            # The watchdog asks every few seconds: a store that is down must not stop it
            # (the loop is fine; systemd would restart a daemon that is merely waiting).
            live = "state store unreachable"
        else:
            self.metrics.rollbacks_in_flight.set(len(in_flight))
            live = f"{len(in_flight)} rollbacks in flight"
        blind = len(self.engine.blind_checks)
        held = "" if self.keeper is None else f", {len(self.keeper.held())} held"
        return (
            f"{len(services)} services{held}, {checks} checks, {firing} firing, {blind} blind, "
            f"{live}"
        )

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop stalls, systemd notices."""
        interval = self.systemd.watchdog_interval or 5.0
        while True:
            self.systemd.send("WATCHDOG=1", f"STATUS={self.status_line()}")
            await asyncio.sleep(interval)

    async def _shutdown(self) -> None:
        self.systemd.stopping()
        log.info("rollbackd stopping")
        if self.api is not None:
            await self.api.stop()
        self.scheduler.shutdown()
        grace = self.loaded.config.daemon.stop_grace.total_seconds()
        try:
            await asyncio.wait_for(self.pipeline.wait_idle(), timeout=grace)
        except TimeoutError:
            log.warning("rollbacks still running after stop_grace: stopping them", grace=grace)
            await self.pipeline.interrupt_all(
                f"the daemon was stopped and the rollback did not finish within {grace:g}s"
            )
        # Held until the rollbacks above are over, and given back before the store closes.
        await self._stop_relay()
        await self._stop_leases()
        # After the pipeline: its last events (rollback.failed) must still go out.
        await self.dispatcher.stop(timeout=5.0)
        try:
            await self.engine.versions.flush()  # last_seen is written in batches
        finally:
            # The writes already asked for go in before the store closes.
            writer_for(self.store).close()
            self.store.close()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self.dispatcher.start()
        # The HTTP API, /metrics and the Alertmanager webhook, on [server].listen.
        self.api = await start_api(self.control, on_exit=self.stop)
        # This daemon's share of the services held before it acts on any of them.
        try:
            await self._start_leases()
        except MemberTakenError:
            await self._shutdown()  # nothing scheduled yet: the API stops, the store closes
            raise
        # Before anything is scheduled: rollbacks a crash left running are verified or
        # marked interrupted, never re-run.
        await self.pipeline.recover()
        await self.pipeline.expire_pending()
        self.scheduler.start()
        # What other daemons took for the services held here: after recovery, as a
        # request reaching this daemon itself would be.
        await self._start_relay()
        # Expired and superseded approvals, and triggers that still fire after a refusal
        # that may lapse (cooldown over, resumed, thawed, mode changed): decided again.
        self.scheduler.add_periodic("pipeline:housekeeping", self.pipeline.housekeeping, 5.0)
        if self.keeper is not None:
            # A service taken over from a daemon that died may have a rollback in flight:
            # verified as after a crash, never re-run (recover skips what this daemon runs).
            self.scheduler.add_periodic(
                "pipeline:recover-taken-over", self.pipeline.recover, self.keeper.lease_time / 3
            )
        checks = sum(len(s.rules.check) for s in self.loaded.services.values())
        log.info(
            "rollbackd started",
            services=len(self.loaded.services),
            checks=checks,
            listen=self.loaded.config.server.listen,
            mode=self.loaded.config.daemon.mode.value,
        )
        self.systemd.ready(self.status_line())
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            await self._stop.wait()
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            await self._shutdown()


def run(config_path: Path) -> int:
    try:
        loaded = load(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    configure(loaded.config.daemon.log_format, loaded.config.daemon.log_level)
    try:
        daemon = Daemon(config_path)
    except (StoreError, OSError) as exc:
        # Without its state the daemon could neither keep its promises (one rollback per
        # release, cooldowns) nor a record: it refuses to start, and says why.
        log.critical("cannot open the state store: not starting", error=str(exc))
        print(f"rollbackd: cannot open the state store: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(daemon.serve())
    except ApiStartError as exc:
        log.critical("cannot serve the API: not starting", error=str(exc))
        print(f"rollbackd: {exc}", file=sys.stderr)
        return 1
    except MemberTakenError as exc:
        log.critical("member name taken: not starting", error=str(exc))
        print(f"rollbackd: {exc}", file=sys.stderr)
        return 1
    return 0
