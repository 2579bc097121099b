"""Wake-ups from the other daemons: a ``LISTEN`` session of its own, in a thread.

A notification is a hint to look now (an alert to hand over, a request to take, an answer
to read), never the work itself: the runtime polls too, because a notification sent while
this session was down (the database restarted, the network cut) is lost. So the thread
only reconnects and wakes; it never raises, and it wakes once on every (re)connect, in
case something was missed meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
from psycopg import sql

from rollbackd.logs import get_logger
from rollbackd.store.postgres.connections import Settings

log = get_logger("rollbackd.store")

RETRY = 1.0
"""Seconds between attempts to reconnect the listening session."""

WAIT = 0.5
"""Seconds one wait for notifications lasts: how soon ``close`` is noticed."""


class Listener:
    """Calls ``wake`` (from its own thread) on every notification of ``channel``."""

    def __init__(self, settings: Settings, channel: str, wake: Callable[[], None]) -> None:
        self._settings = settings
        self._channel = channel
        self._wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollbackd-listener", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WAIT * 4)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._settings.url, autocommit=True, **self._settings.keywords()
                ) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    if failing:
                        log.info("listening for other daemons again")
                    failing = False
                    self._wake()  # whatever was sent while not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=WAIT):
                            self._wake()
            except psycopg.Error as error:
                if not failing:
                    log.warning(
                        "cannot listen for other daemons: polling only",
                        database=self._settings.location,
                        error=str(error),
                    )
                failing = True
                self._stop.wait(RETRY)
