"""Running an ASGI app under uvicorn: in the foreground for ``serve``, in a thread for demos and tests.

The uvicorn options live here once, so the proxy, the emulator, the demo and the tests all run on the
same server stack (uvloop + httptools, no access log, no headers of uvicorn's own: a transparent proxy
passes Ollama's ``Date`` through and adds no ``Server``).
"""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import uvicorn
from starlette.types import ASGIApp


def config(app: ASGIApp, host: str, port: int, **options: object) -> uvicorn.Config:
    """The uvicorn configuration every otellama server uses."""
    settings: dict[str, object] = {
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "server_header": False,
        "date_header": False,
        "log_level": "warning",
        "lifespan": "on",
        # X-Forwarded-* rewriting is for apps behind a proxy; otellama is the proxy and forwards them.
        "proxy_headers": False,
        # Ollama clients keep connections open between requests; uvicorn's 5 s default churns them.
        "timeout_keep_alive": 65,
    }
    settings.update(options)
    return uvicorn.Config(cast(Any, app), host=host, port=port, **cast(dict[str, Any], settings))


class BackgroundServer:
    """A real uvicorn server on a real socket, run in a daemon thread with its own event loop.

    ``port=0`` picks a free port; :attr:`port` and :attr:`url` tell which after :meth:`start`.
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, **options: object):
        self.server = uvicorn.Server(config(app, host, port, **options))
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{host}:{port}", daemon=True)

    def _run(self) -> None:
        self.server.run()  # uvloop via uvicorn's loop factory; signals stay with the main thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.host}:{self.port} did not start within {timeout} s")
            time.sleep(0.005)
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        self.port = sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
