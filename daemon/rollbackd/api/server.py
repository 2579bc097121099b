"""Serving the API inside the daemon: uvicorn as a task of the daemon's event loop.

``start_api`` reads the token, builds the app over the daemon's ``Control`` and serves it
on ``[server].listen``; ``ApiServer`` binds the socket itself (so clients may connect as
soon as the address is known) and writes ``api.address`` into the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from rollbackd.api.app import create_app
from rollbackd.config.secrets import SecretError, read_api_token
from rollbackd.logs import get_logger
from rollbackd.runtime.control import Control

log = get_logger("rollbackd.server")

ADDRESS_FILE = "api.address"
"""Written into state_dir once the API listens: ``host:port``, for clients when the
configured port is 0 (tests, demos) and for people asking where the daemon listens."""
PROMETHEUS_PROBE_TIMEOUT = 2.0
"""Seconds /readyz waits for Prometheus's /-/ready."""


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9095"`` or ``"[::1]:9095"`` -> host and port."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would take SIGINT and SIGTERM for itself; they are the daemon's, which
        # stops the server through ApiServer.stop().
        yield


class ApiServer:
    """Serves an ASGI app on ``listen`` as a task of the running loop."""

    def __init__(
        self,
        app: ASGIApp,
        listen: str,
        *,
        address_file: Path | None = None,
        on_exit: Callable[[], None] | None = None,
        graceful: int = 5,
    ) -> None:
        self.app = app
        self.listen = listen
        self.address_file = address_file
        self.on_exit = on_exit
        self.graceful = graceful
        self._socket: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _bind(self) -> socket.socket:
        host, port = split_listen(self.listen)
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            # Listening now, not when uvicorn gets to it: clients that connect as soon as
            # the address is known wait in the backlog instead of being refused.
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        """Bind (raises OSError: address in use, not allowed) and start serving."""
        try:
            self._socket = self._bind()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.listen}: {exc.strerror}") from exc
        bound = self._socket.getsockname()
        self.host, self.port = str(bound[0]), int(bound[1])
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,  # the daemon's logging (structlog) already handles uvicorn's
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=self.graceful,
            timeout_keep_alive=5,
            limit_concurrency=256,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(
            self._server.serve(sockets=[self._socket]), name="rollbackd-api"
        )
        self._task.add_done_callback(self._exited)
        if self.address_file is not None:
            _write_atomically(self.address_file, f"{self.host}:{self.port}\n")
        log.info("api listening", url=self.url)

    def _exited(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        log.error("the API server stopped by itself: stopping the daemon", error=repr(error))
        if self.on_exit is not None:
            self.on_exit()

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.graceful + 5)
            except TimeoutError:
                self._task.cancel()
            except Exception as exc:  # the server's own failure, already logged
                log.warning("the API server ended with an error", error=repr(exc))
        if self._socket is not None:
            self._socket.close()
        if self.address_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.address_file.unlink()


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        Path(temporary).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(temporary).unlink()
        raise


class ApiStartError(Exception):
    """The API cannot be served: no token, or the address cannot be bound."""


async def start_api(control: Control, *, on_exit: Callable[[], None]) -> ApiServer:
    """Read the token, build the app and serve it on ``[server].listen``. ``on_exit`` is
    called when the server stops by itself (the daemon stops then)."""
    server = control.loaded.config.server
    try:
        token = read_api_token(server)
    except SecretError as exc:
        raise ApiStartError(f"[server] {exc}") from None
    app = create_app(
        control=control,
        registry=control.registry,
        token=token,
        max_body=server.max_body,
        webhook_max_body=server.webhook_max_body,
        prometheus_ready=control.prometheus_probe(PROMETHEUS_PROBE_TIMEOUT),
    )
    api = ApiServer(
        app,
        server.listen,
        address_file=control.state_dir / ADDRESS_FILE,
        on_exit=on_exit,
    )
    try:
        await api.start()
    except OSError as exc:
        raise ApiStartError(str(exc.strerror or exc)) from None
    return api
