"""The ASGI app: Ollama's paths go to the proxy, ``/otellama/*`` to otellama's own routes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import httpx
from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import TracerProvider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from otellama import __version__
from otellama.exchange import Recorder
from otellama.exporter.relay import merge_expositions
from otellama.exporter.supervise import Supervisor
from otellama.proxy.auth import ADMIN_PREFIX, Gate
from otellama.proxy.forward import Proxy
from otellama.proxy.hosts import HostPool
from otellama.proxy.routing import RoutingProxy
from otellama.proxy.transport import HttpTransport
from otellama.settings import Settings
from otellama.sinks.fanout import Sink, Telemetry
from otellama.sinks.jsonlog import JsonLog, JsonLogSink
from otellama.sinks.otel.export import resource, selected_exporters
from otellama.sinks.otel.sink import OtelSink
from otellama.sinks.stats import RollingStats, parse_window

log = logging.getLogger("otellama")

#: With ``OTELLAMA_LOG_FILE=off`` the exporter follows a private spool instead: its bounds (two files).
SPOOL_BYTES: Final = 32_000_000


class UpstreamProbe:
    """Asks Ollama for its version every few seconds so ``/otellama/health`` can say whether it answers."""

    def __init__(self, url: str, interval: float) -> None:
        self.client = httpx.AsyncClient(transport=HttpTransport(), trust_env=False)
        self.url = url
        self.interval = interval
        self.ok: bool | None = None  # None until the first probe finished
        self.checked_at: str | None = None
        self.error: str | None = None
        self.upstream_version: str | None = None

    async def probe(self) -> None:
        try:
            response = await self.client.get(self.url + "/api/version", timeout=5.0)
            self.ok = response.status_code == 200
            self.error = None if self.ok else f"HTTP {response.status_code}"
            if self.ok:
                with contextlib.suppress(ValueError, AttributeError):
                    self.upstream_version = response.json().get("version")
        except Exception as exc:  # any failure means "did not answer"; the reason goes in the report
            self.ok, self.error = False, f"{type(exc).__name__}: {exc}"
        self.checked_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    async def run(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        await self.client.aclose()


def disabled_instrumentations(environ: Mapping[str, str]) -> frozenset[str]:
    """``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` as opentelemetry-instrument reads it (comma-separated)."""
    raw = environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


class TraceparentTransport(httpx.AsyncBaseTransport):
    """Sends the exchange's trace context to Ollama (``traceparent``, and whatever ``OTEL_PROPAGATORS``
    adds) when the httpx instrumentation is disabled: no span of the upstream call, the same headers."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        from opentelemetry.propagate import inject

        self._inner = inner
        self._inject = inject

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._inject(request.headers)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class App:
    """otellama's ASGI application. Everything it talks to can be injected, so tests need no patching."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        recorder: Recorder | None = None,
        tracer_provider: TracerProvider | None = None,
        metric_readers: Sequence[MetricReader] = (),
    ) -> None:
        self.settings = settings
        self.gate = Gate.from_settings(settings)  # None unless OTELLAMA_API_KEYS_FILE is set
        self.telemetry: Telemetry | None = None
        #: The sinks behind ``/otellama/metrics`` and ``/otellama/stats``; None when a recorder replaced them.
        self.otel: OtelSink | None = None
        self.rolling: RollingStats | None = None
        self.transport = transport or HttpTransport()
        #: The exporter process, when spans and metrics are exported from the log (see otellama.exporter).
        self.supervisor: Supervisor | None = None
        self._exit_requested_at: float | None = None
        #: The private spool the exporter follows when no log is wanted (removed at shutdown).
        self._spool: str | None = None
        if recorder is None:
            environ = os.environ
            # Spans, metrics and the stats window are rendered by a process of its own, from the log: this
            # one only writes each exchange's line (README, "How export works"). An injected provider or
            # reader is the caller's, in this process, and so is everything else then.
            elsewhere = tracer_provider is None and not metric_readers
            log_settings = settings
            if elsewhere and settings.log_file is None:
                log_settings = self._spool_settings(settings)
                elsewhere = log_settings.log_file is not None
            self.otel = OtelSink(
                tracer_provider=tracer_provider, metric_readers=metric_readers, export_here=not elsewhere
            )
            if elsewhere:
                instance = resource(environ).attributes.get("service.instance.id")
                supervisor = self.supervisor = Supervisor(
                    log_settings,
                    environ,
                    self.otel.exporter_failed,
                    self.otel.in_flight_now.copy,
                    instance_id=str(instance) if instance is not None else None,
                    hosts=lambda: self.hosts.states(),  # the host pool is built below
                    feed_hosts=bool(selected_exporters(environ, "metrics")),
                )
                self.otel.watch_exporter(supervisor.total, lambda: supervisor.restarts)
            else:
                self.rolling = RollingStats()  # GET /otellama/stats: recent exchanges, in bounded memory
            sinks: list[Sink] = []
            if log_settings.log_file is not None:
                log_file = JsonLog(
                    log_settings.log_file,
                    max_bytes=log_settings.log_max_bytes,
                    backups=log_settings.log_backups,
                )
                sinks.append(JsonLogSink(log_file, self.otel.log_failed))
            if self.rolling is not None:
                sinks += [self.otel, self.rolling]
            recorder = self.telemetry = Telemetry(settings, self.otel, sinks)
            if self.otel.tracing and "httpx" in disabled_instrumentations(environ):
                self.transport = TraceparentTransport(self.transport)
            elif self.otel.tracing:
                # Traces the upstream call and sends its traceparent to Ollama.
                self.transport = AsyncOpenTelemetryTransport(
                    self.transport, tracer_provider=self.otel.call_tracer_provider
                )
        timeout = httpx.Timeout(
            connect=settings.connect_timeout, read=settings.read_timeout, write=None, pool=None
        )
        #: The Ollama hosts, and what each has loaded; polled when there are several.
        self.hosts = HostPool(settings.hosts, settings.poll_interval)
        # One host needs no routing; several get the proxy that picks one per request and fails over.
        kind = RoutingProxy if self.hosts.routing else Proxy
        self.proxy = kind(
            settings.upstream, self.transport, timeout=timeout, recorder=recorder, pool=self.hosts
        )
        if self.otel is not None:
            self.otel.watch_hosts(self.hosts.states)
        # Probes get a client of their own so they stay out of the traces.
        self.probe = UpstreamProbe(settings.upstream.url, settings.probe_interval)
        self.admin = Starlette(
            routes=[
                Route("/otellama/health", self.health, methods=["GET", "HEAD"]),
                Route("/otellama/metrics", self.metrics, methods=["GET"]),
                Route("/otellama/stats", self.stats, methods=["GET"]),
            ]
        )
        self._background: list[asyncio.Task[Any]] = []

    def _spool_settings(self, settings: Settings) -> Settings:
        """``settings`` with a private spool as the log, for the exporter to follow when no log is wanted;
        unchanged (export stays in this process) where no temporary directory can be made."""
        try:
            self._spool = tempfile.mkdtemp(prefix="otellama-spool-")
        except OSError as exc:
            log.warning("no temporary directory for the export spool (%s); exporting from this process", exc)
            return settings
        # Removed at shutdown, or when this app goes away unstarted (garbage, or the interpreter's exit).
        self._remove_spool = weakref.finalize(self, shutil.rmtree, self._spool, True)
        spool = Path(self._spool) / "spool.jsonl"
        return dataclasses.replace(settings, log_file=spool, log_max_bytes=SPOOL_BYTES, log_backups=1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.gate is not None and not await self.gate.admit(scope, send):
                return  # refused with a 401
            if scope["path"].startswith(ADMIN_PREFIX):
                await self.admin(scope, receive, send)
            else:
                await self.proxy(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:  # Ollama speaks no WebSocket
            await send({"type": "websocket.close", "code": 1003})

    async def health(self, request: Request) -> Response:
        """``GET /otellama/health``: always 200 while otellama runs; says whether Ollama answered."""
        return JSONResponse(
            {
                "status": "ok",
                "version": __version__,
                "upstream": self.settings.upstream.url,
                "upstream_ok": self.probe.ok,
                "upstream_checked_at": self.probe.checked_at,
                "upstream_error": self.probe.error,
                "upstream_version": self.probe.upstream_version,
                **({"upstreams": self._upstreams()} if self.hosts.routing else {}),
            }
        )

    def _upstreams(self) -> list[dict[str, Any]]:
        return [
            {
                "name": state.name,
                "url": host.upstream.url,
                "up": state.up,
                "down_reason": host.down_reason,
                "in_flight": state.in_flight,
                "loaded": [model.name for model in state.loaded],
            }
            for host, state in zip(self.hosts.hosts, self.hosts.states(), strict=True)
        ]

    async def metrics(self, request: Request) -> Response:
        """``GET /otellama/metrics``: every instrument in Prometheus text format."""
        if self.otel is None:
            return Response(status_code=404)  # a custom recorder replaced telemetry
        from prometheus_client import CONTENT_TYPE_LATEST

        own = self.otel.prometheus()
        if self.supervisor is None:
            return Response(own, media_type=CONTENT_TYPE_LATEST)
        rendered = await self.supervisor.ask({"metrics": self.supervisor.report()})
        if rendered is None:
            return _exporter_unavailable()
        # The exporter's families, and the few only this process knows (log failures, exporter restarts).
        return Response(merge_expositions(rendered, own), media_type=CONTENT_TYPE_LATEST)

    async def stats(self, request: Request) -> Response:
        """``GET /otellama/stats[?window=1h]``: recent exchanges per model, as ``otellama report --json``."""
        if self.otel is None:
            return Response(status_code=404)  # a custom recorder replaced telemetry
        try:
            window = parse_window(request.query_params.get("window"))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if self.supervisor is not None:
            answer = await self.supervisor.ask({"stats": window})
            if answer is None:
                return _exporter_unavailable()
            return Response(answer, media_type="application/json")
        if self.rolling is None:
            return Response(status_code=404)  # a custom recorder replaced telemetry
        # Sorting a full window takes a while: off the event loop, so that proxying carries on.
        return JSONResponse(await asyncio.to_thread(self.rolling.summary, window))

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self.probe.run()))
        self.hosts.bind(loop)
        if self.hosts.routing:
            self._background.append(loop.create_task(self.hosts.run()))
        if self.supervisor is not None:
            await self.supervisor.start()
            self._note_exit_request()

    def _note_exit_request(self) -> None:
        """Remember when SIGTERM/SIGINT came (uvicorn's handler is in place by now), so the exporter gets
        what is left of the shutdown grace once the requests drained, not a grace of its own."""
        for number in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(number)
            if not callable(previous):
                continue

            def noted(signum: int, frame: Any, previous: Any = previous) -> None:
                if self._exit_requested_at is None:
                    self._exit_requested_at = time.monotonic()
                previous(signum, frame)

            with contextlib.suppress(ValueError):  # not the main thread (tests' in-thread servers)
                signal.signal(number, noted)

    async def shutdown(self) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.transport.aclose()
        await self.probe.close()
        await self.hosts.close()
        if self.telemetry is not None:
            # Flushing exporters blocks on the network; keep the loop free while it does.
            await asyncio.to_thread(self.telemetry.close)
        if self.supervisor is not None:
            # The log is complete and closed: the exporter sends it to the end, within the grace left.
            grace = self.settings.shutdown_grace
            left = None
            if grace is not None:
                began = self._exit_requested_at or time.monotonic()
                # Nothing is lost when that is no time at all: the rest goes out after the next start.
                left = max(grace - (time.monotonic() - began), 0.0)
            await self.supervisor.stop(left)
        if self._spool is not None:
            self._remove_spool()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _exporter_unavailable() -> Response:
    # A failed scrape (Prometheus records it as such), never counters that read as zero.
    return JSONResponse(
        {"error": "the exporter process, which keeps the metrics and stats, did not answer (restarting?)"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def create_app(
    settings: Settings | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    recorder: Recorder | None = None,
    tracer_provider: TracerProvider | None = None,
    metric_readers: Sequence[MetricReader] = (),
) -> App:
    """Build otellama's ASGI app from ``settings`` (default: the environment).

    Telemetry comes from the standard ``OTEL_*`` environment; tests add a tracer provider or metric readers
    of their own. A ``recorder`` replaces telemetry altogether.
    """
    return App(
        settings or Settings.from_env(),
        transport=transport,
        recorder=recorder,
        tracer_provider=tracer_provider,
        metric_readers=metric_readers,
    )
