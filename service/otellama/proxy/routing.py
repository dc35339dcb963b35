"""Several Ollama hosts behind one address: the proxy that picks a host per request and fails over.

:class:`RoutingProxy` is :class:`~otellama.proxy.forward.Proxy` with one step changed: where the proxy sends
every request to its one upstream, this one asks the :class:`~otellama.proxy.router.Router` for a plan (the
hosts to try, in order, and why) and walks it, or answers the listing endpoints (``/api/tags``,
``/v1/models``, ``/api/ps``) from every host at once. Everything else (header rules, relaying, recording,
failure answers) is the proxy's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from otellama.exchange import ERROR, Exchange, Recorder, Retry
from otellama.proxy.errors import HostsDown, classify_failure, error_body, json_headers
from otellama.proxy.forward import BODY_CAPTURE_LIMIT, Proxy, RelayState, guarded
from otellama.proxy.hosts import Host, HostPool, model_key
from otellama.proxy.router import (
    MERGED,
    MODEL_PATHS,
    UPSTREAM_HEADER,
    Plan,
    Router,
    is_management,
    merge,
    model_of,
)
from otellama.settings import Upstream


class RoutingProxy(Proxy):
    """The proxy in front of several hosts (see the module docstring)."""

    def __init__(
        self,
        upstream: Upstream,
        transport: httpx.AsyncBaseTransport,
        *,
        timeout: httpx.Timeout,
        recorder: Recorder | None = None,
        pool: HostPool,
    ) -> None:
        super().__init__(upstream, transport, timeout=timeout, recorder=recorder, pool=pool)
        self.router = Router(pool)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        raw_path: bytes,
        headers: list[tuple[bytes, bytes]],
        state: RelayState,
        task: asyncio.Task[Any],
    ) -> None:
        """One request with several hosts: answered from all of them, or sent to the host its plan puts
        first, failing over down the plan (:mod:`otellama.proxy.router`)."""
        named: bytes | None = None
        if any(header[0] == UPSTREAM_HEADER for header in headers):
            named = next(value for name, value in headers if name == UPSTREAM_HEADER)
            headers = [header for header in headers if header[0] != UPSTREAM_HEADER]
        path = exchange.path
        first = await receive()
        if first["type"] == "http.disconnect":
            return  # gone before it sent a body: nothing reached Ollama, nothing to record
        body: bytes = first.get("body", b"")
        if named is None and (exchange.method, path) in MERGED and not first.get("more_body", False):
            await self._merged(exchange, send, path)
            return
        if first.get("more_body", False) and path in MODEL_PATHS:
            # The model is in the body: read it (up to the capture limit, as nginx buffers bodies) to route.
            parts = [body]
            size = len(body)
            more = True
            while more and size <= BODY_CAPTURE_LIMIT:
                received = await receive()
                if received["type"] == "http.disconnect":
                    return
                parts.append(received.get("body", b""))
                size += len(parts[-1])
                more = received.get("more_body", False)
            body = b"".join(parts)
            first = {"type": "http.request", "body": body, "more_body": more}
        content = self._content(body, first.get("more_body", False), receive, exchange, state, task)

        if named is not None:
            host = self.pool.named(named.decode("latin-1"))
            if host is None:
                state.stop_watching()
                names = ", ".join(host.name for host in self.pool.hosts)
                refusal = f"otellama: no upstream is named {named.decode('latin-1')[:64]!r}; they are {names}"
                await self._refuse(exchange, send, 400, refusal)
                return
            model = model_of(path, content if isinstance(content, bytes) else None)
            plan = Plan([host], "only", model_key(model) if model else None)
        elif is_management(path):
            plan = self.router.for_management(None)
        else:
            plan = self.router.for_model(model_of(path, content if isinstance(content, bytes) else None))

        recording = guarded(self.recorder.begin, exchange) if self.recorder is not None else None
        target = raw_path + (b"?" + exchange.query if exchange.query else b"")
        state.model = plan.model
        opening = self._open_routed(plan, exchange, target, headers, content, state)
        await self._exchange(scope, send, exchange, state, task, recording, opening)

    async def _open_routed(
        self,
        plan: Plan,
        exchange: Exchange,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        content: bytes | AsyncIterator[bytes],
        state: RelayState,
    ) -> httpx.Response:
        """The response of the first host in ``plan`` that takes the request.

        A host that refuses the connection or does not accept it in time is marked down and the next one is
        tried; so is one that answers 503 ("server busy": its queue is full) while the body is still in
        memory, unless it is the last. Once a byte of a streamed body went to a host, nothing is re-sent.
        """
        tried: list[tuple[str, str]] = []
        last = len(plan.hosts) - 1
        for index, host in enumerate(plan.hosts):
            request = self._request(
                host, exchange.method, target, [*headers, (b"host", host.host_header)], content
            )
            state.host, state.upstream = host, host.upstream
            # Named before the answer: a request that fails on this host is recorded as this host's.
            exchange.upstream = host.name
            exchange.upstream_address = (host.upstream.host, host.upstream.port)
            if not exchange.retries:
                exchange.route = plan.reason
            else:
                exchange.route = "spill" if exchange.retries[-1].reason == "busy" else "failover"
            host.started(plan.model)
            try:
                response = await self.transport.handle_async_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                state.host = None
                host.ended(plan.model, None)
                if state.body_sent:
                    raise
                kind = "connect_timeout" if isinstance(exc, httpx.ConnectTimeout) else "connect_error"
                host.failed(f"{kind}: {exc}")
                exchange.retries.append(Retry(host.name, kind, time.perf_counter()))
                tried.append((host.name, str(exc) or kind))
                continue
            host.answered()
            if response.status_code == 503 and index < last and isinstance(content, bytes):
                await response.aclose()
                state.host = None
                host.ended(plan.model, None)
                exchange.retries.append(Retry(host.name, "busy", time.perf_counter()))
                tried.append((host.name, "busy"))
                continue
            return response
        exchange.upstream = exchange.upstream_address = exchange.route = None
        raise HostsDown(tried)

    async def _merged(self, exchange: Exchange, send: Send, path: str) -> None:
        """``GET path`` answered from every host that answers (:func:`~otellama.proxy.router.merge`)."""
        hosts = [host for host in self.pool.hosts if host.up is not False] or self.pool.hosts
        answers = await asyncio.gather(*(self._ask(host, path) for host in hosts))
        exchange.route = "all"
        got = [(host, answer) for host, (answer, _) in zip(hosts, answers, strict=True) if answer is not None]
        if got:
            body = merge(path, got)
            await self._answer(exchange, send, 200, body, json_headers(body))
            return
        failure = HostsDown([(host.name, reason) for host, (_, reason) in zip(hosts, answers, strict=True)])
        status, message, error_type = classify_failure(failure, self.upstream)
        exchange.outcome, exchange.error, exchange.error_type = ERROR, message, error_type
        body = error_body(path, message)
        await self._answer(exchange, send, status, body, json_headers(body))

    async def _ask(self, host: Host, path: str) -> tuple[Any, str]:
        try:
            answer = await self.pool.fetch(host, path)
        except httpx.TransportError as exc:
            host.failed(f"{type(exc).__name__}: {exc}")
            return None, str(exc) or type(exc).__name__
        except (ValueError, TimeoutError) as exc:
            return None, str(exc) or type(exc).__name__
        host.answered()
        return answer, ""
