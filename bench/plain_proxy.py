"""otellama's proxy with telemetry off, for the benchmark's "telemetry off" column.

The product has no switch for this (the JSONL log and /otellama/metrics are always wanted); the benchmark
swaps in a recorder that does nothing, so the figures show the byte path alone. Everything else is as
``otellama serve`` runs it, the guarded client protocol (connection.py) included.

Usage: python bench/plain_proxy.py --host 127.0.0.1 --port 11435 --upstream http://127.0.0.1:11434
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import uvicorn

from otellama import server
from otellama.app import create_app
from otellama.exchange import Exchange, Recording
from otellama.proxy import connection
from otellama.settings import Settings


class NoTelemetry:
    """A recorder that records nothing."""

    def begin(self, exchange: Exchange) -> Recording:
        return _Nothing()


class _Nothing:
    def observe(self, exchange: Exchange) -> Callable[[bytes, float], None] | None:
        return None

    def finish(self, exchange: Exchange) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11435)
    parser.add_argument("--upstream", default="http://127.0.0.1:11434")
    args = parser.parse_args()
    settings = Settings.from_env(host=args.host, port=args.port, upstream=args.upstream)
    app = create_app(settings, recorder=NoTelemetry())
    config = server.config(
        app,
        settings.host,
        settings.port,
        http=connection.protocol(settings.client_timeout),
        timeout_graceful_shutdown=settings.shutdown_grace,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
