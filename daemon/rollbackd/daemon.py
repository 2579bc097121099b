"""``rollbackd run``: the daemon's lifecycle.

Start: load and validate everything, open the store, schedule the checks. SIGHUP: load the
new config and rules; when they are valid, swap them in (unchanged checks keep their state),
else keep the old ones and say why. SIGTERM / SIGINT: stop scheduling and close the store.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from prometheus_client import start_http_server

from rollbackd.engine import Engine
from rollbackd.loader import ConfigError, LoadedConfig, load
from rollbackd.logs import configure, get_logger
from rollbackd.metrics import Metrics
from rollbackd.pipeline import Pipeline
from rollbackd.prometheus import PrometheusClient
from rollbackd.scheduler import Scheduler
from rollbackd.store import Store

log = get_logger("rollbackd.daemon")

STATE_FILE = "state.db"


def open_store(loaded: LoadedConfig) -> Store:
    state_dir = Path(loaded.config.daemon.state_dir)
    if not state_dir.is_absolute():
        state_dir = loaded.path.resolve().parent / state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    return Store(state_dir / STATE_FILE)


class Daemon:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.loaded = load(config_path)
        self.metrics = Metrics()
        self.store = open_store(self.loaded)
        self.client = PrometheusClient(self.loaded.config.prometheus)
        self.engine = Engine(self.loaded, self.client, self.store, metrics=self.metrics)
        self.pipeline = Pipeline(self.engine)
        self.engine.on_fire = self.pipeline.on_fire
        self.scheduler = Scheduler(self.engine)
        self._stop = asyncio.Event()

    def reload(self) -> bool:
        try:
            loaded = load(self.config_path)
        except ConfigError as exc:
            log.error(
                "reload failed: keeping the running config",
                problems=[str(p) for p in exc.problems],
            )
            return False
        self.loaded = loaded
        self.scheduler.reload(loaded)
        log.info("reloaded", services=len(loaded.services))
        return True

    def stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        host, _, port = self.loaded.config.server.listen.rpartition(":")
        # Until the HTTP API lands, the daemon's own metrics are served on [server].listen.
        start_http_server(int(port), addr=host.strip("[]"), registry=self.metrics.registry)
        # Before anything is scheduled: rollbacks a crash left running are verified or
        # marked interrupted, never re-run.
        await self.pipeline.recover()
        await self.pipeline.expire_pending()
        self.scheduler.start()
        self.scheduler.add_periodic("pipeline:expire", self.pipeline.expire_pending, 5.0)
        checks = sum(len(s.rules.check) for s in self.loaded.services.values())
        log.info(
            "rollbackd started",
            services=len(self.loaded.services),
            checks=checks,
            listen=self.loaded.config.server.listen,
            mode=self.loaded.config.daemon.mode.value,
        )
        try:
            await self._stop.wait()
        finally:
            log.info("rollbackd stopping")
            self.scheduler.shutdown()
            self.store.close()


def run(config_path: Path) -> int:
    try:
        loaded = load(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    configure(loaded.config.daemon.log_format, loaded.config.daemon.log_level)
    daemon = Daemon(config_path)
    asyncio.run(daemon.serve())
    return 0
