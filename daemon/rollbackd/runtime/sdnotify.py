"""systemd's notify protocol (sd_notify), in the few lines it takes.

Messages go as one datagram to ``$NOTIFY_SOCKET`` (``@`` means the abstract namespace).
Without the variable (not under systemd) every call is a no-op, so the daemon runs the same
in a terminal. Failures to send are logged, never raised: systemd being gone must not take
the daemon down.
"""

from __future__ import annotations

import os
import socket
import time

from rollbackd.logs import get_logger

log = get_logger("rollbackd.sdnotify")


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None without one."""
        return self._watchdog_usec / 2_000_000 if self._watchdog_usec else None

    def send(self, *fields: str) -> bool:
        if self._address is None:
            return False
        address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(fields).encode())
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _watchdog_usec(env: os._Environ[str] | dict[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent wrapper, say)
    return usec if usec > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]
