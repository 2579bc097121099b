"""A TCP forwarder between a daemon and PostgreSQL, for cutting the daemon off.

:class:`TcpProxy` listens on a free port of 127.0.0.1 and forwards every connection to its
upstream, two threads per connection (one per direction). :meth:`TcpProxy.cut` closes every
forwarded connection (both ends) and, until :meth:`TcpProxy.restore`, refuses new ones: it
accepts and closes them at once, so that a client's connect fails fast ("server closed the
connection unexpectedly") while the port stays this proxy's, for the restore to reuse.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self

_CHUNK = 64 * 1024
_ACCEPT_WAIT = 0.1
"""Seconds an accept waits before it looks whether the proxy was closed."""


def _shut(sock: socket.socket) -> None:
    """Close ``sock``, waking a thread blocked in its recv (close alone does not)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``, until cut."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_ACCEPT_WAIT)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    def cut(self) -> None:
        """Close every forwarded connection; refuse new ones until :meth:`restore`."""
        with self._lock:
            self._cut = True
            cut, self._open = self._open, set()
        for sock in cut:
            _shut(sock)

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed.set()
        self.cut()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=5)
        _shut(self._listener)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            client.settimeout(None)
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        if self._is_cut():
            _shut(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _shut(client)
            return
        upstream.settimeout(None)
        with self._lock:
            # Checked again under the lock: a cut() while connecting must end this pair too.
            if self._cut:
                refused = True
            else:
                refused = False
                self._open.update((client, upstream))
        if refused:
            _shut(client)
            _shut(upstream)
            return
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _is_cut(self) -> bool:
        with self._lock:
            return self._cut

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy ``source`` to ``sink`` until either ends; then end both."""
        try:
            while data := source.recv(_CHUNK):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            _shut(source)
            _shut(sink)
