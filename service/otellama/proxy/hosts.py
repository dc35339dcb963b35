"""The Ollama hosts behind otellama: where each is, whether it answers, what it has and has loaded.

Every host is asked ``/api/ps`` every ``OTELLAMA_POLL_INTERVAL`` seconds and ``/api/tags`` every
:data:`~otellama.settings.TAGS_EVERY` polls (and soon after it answers "model not found"). The router
(:mod:`otellama.proxy.router`) reads the result; so do the per-host gauges, as
:class:`~otellama.exchange.HostState` snapshots. A single upstream is never polled on a timer (it needs no
routing, and otellama in front of one Ollama sends it nothing of its own but the health probe, as before):
once it has answered a model request through otellama, its snapshot is refreshed when the gauges read it,
at most once per poll interval.

What a host says is untrusted: every answer is read up to :data:`ANSWER_LIMIT` bytes, at most
:data:`MODEL_LIMIT` models are kept per host, and a model name longer than :data:`NAME_LIMIT` is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import Counter
from typing import Any, Final

import httpx
import orjson

from otellama.exchange import HostState, LoadedModel
from otellama.proxy.transport import HttpTransport
from otellama.settings import TAGS_EVERY, Upstream

log = logging.getLogger(__name__)

#: Largest ``/api/tags``, ``/api/ps`` or ``/v1/models`` answer read from a host (a model entry is ~500 B).
ANSWER_LIMIT: Final = 4 << 20
#: Most models remembered per host; a host listing more is believed about its first ones only.
MODEL_LIMIT: Final = 1024
#: Longest model name believed (Ollama's own names are far shorter).
NAME_LIMIT: Final = 256
#: Seconds a poll or a merged answer waits for one host.
POLL_TIMEOUT: Final = 5.0


def model_key(name: str) -> str:
    """A model name as Ollama matches it: case-insensitive, ``:latest`` when no tag is given."""
    key = name.strip().lower()
    if ":" not in key.rsplit("/", 1)[-1]:
        key += ":latest"
    return key


class Host:
    """One Ollama host and what otellama knows of it. Only the event loop's thread changes it."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.name = upstream.name
        #: None until it answered or failed once; a host not known to be down is tried.
        self.up: bool | None = None
        self.down_reason: str | None = None
        self.in_flight = 0
        #: The models it has (``/api/tags``); None until known, and then every model counts as present.
        self.models: frozenset[str] | None = None
        #: What ``/api/ps`` said is loaded, by model key.
        self.loaded: dict[str, LoadedModel] = {}
        self.polled_at: float | None = None
        #: Models learned loaded since the last poll: sent here and answered (a small load_duration means it
        #: was loaded, a large one that it is now), or on their way (it will be loaded when they run).
        self.learned: set[str] = set()
        self._running: Counter[str] = Counter()
        self.tags_due = True
        #: It answered a model request (generate, chat, embed, show) through otellama: there is something
        #: loaded worth asking about. Until then a single upstream is never asked /api/ps.
        self.served = False
        # Where requests go: the host's address as parts, and the Host header Ollama accepts.
        self.origin = httpx.URL(scheme=upstream.scheme, host=upstream.host, port=upstream.port)
        self.prefix = upstream.path.encode("latin-1")
        self.host_header = upstream.host_header
        self._urls: dict[bytes, httpx.URL] = {}

    def url(self, target: bytes) -> httpx.URL:
        """The URL of ``target`` (a path and query) on this host, never parsed from joined text."""
        # Parsing a URL costs ~9 µs and Ollama clients use a handful of paths: remember them (bounded,
        # as blob digests and query strings are unbounded). The target goes in as the path, never joined
        # to the upstream's address as text: "http://ollama:11434" + "*@elsewhere/x" parses as a request
        # to elsewhere. Host and port are the configured ones whatever the target holds.
        url = self._urls.get(target)
        if url is None:
            if len(self._urls) >= 1024:
                self._urls.clear()
            url = self._urls[target] = self.origin.copy_with(raw_path=self.prefix + target)
        return url

    def has(self, key: str) -> bool:
        return self.models is None or key in self.models

    def warm(self, key: str) -> bool:
        return key in self.loaded or key in self.learned or self._running[key] > 0

    def started(self, key: str | None) -> None:
        self.in_flight += 1
        if key is not None:
            self._running[key] += 1

    def ended(self, key: str | None, status: int | None) -> None:
        self.in_flight -= 1
        if key is None:
            return
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]
        if status is not None and 200 <= status < 300:
            self.learned.add(key)
        elif status == 404:
            self.tags_due = True  # "model not found": its list may be out of date

    def answered(self) -> None:
        self.up, self.down_reason = True, None

    def failed(self, reason: str) -> None:
        if self.up is not False:
            log.warning("Ollama host %s (%s) is down: %s", self.name, self.upstream.url, reason)
        self.up, self.down_reason = False, reason
        self.tags_due = True

    def state(self, named: bool = True) -> HostState:
        now = time.monotonic()
        age = 0.0 if self.polled_at is None else now - self.polled_at
        return HostState(
            name=self.name if named else "",
            address=self.upstream.host,
            port=self.upstream.port,
            up=self.up,
            in_flight=self.in_flight,
            loaded=tuple(
                LoadedModel(m.name, m.size, m.size_vram, max(0.0, m.expires_in - age))
                for m in self.loaded.values()
            ),
            installed=tuple(sorted(self.models or ())),
            polled_at=self.polled_at,
        )


class HostPool:
    """Every configured host, and the poller that keeps what otellama knows of them current."""

    def __init__(self, upstreams: tuple[Upstream, ...], poll_interval: float) -> None:
        self.hosts = [Host(upstream) for upstream in upstreams]
        self.poll_interval = poll_interval
        # A client of its own, so that polls stay out of the traces and off the proxy's pool.
        self.client = httpx.AsyncClient(transport=HttpTransport(), trust_env=False)
        self._polls = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def routing(self) -> bool:
        """Whether there is anything to route: more than one host."""
        return len(self.hosts) > 1

    def named(self, name: str) -> Host | None:
        return next((host for host in self.hosts if host.name == name), None)

    async def run(self) -> None:
        """Poll every host every ``poll_interval`` seconds, for as long as otellama runs."""
        self._loop = asyncio.get_running_loop()
        if not self.routing:
            return  # one host: refreshed on demand by states()
        while True:
            await self.poll()
            await asyncio.sleep(self.poll_interval)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def poll(self) -> None:
        """Ask every host what it has loaded (and, when due, what it has) at once."""
        self._polls += 1
        every = self._polls % TAGS_EVERY == 1
        await asyncio.gather(*(self._poll(host, every or host.tags_due) for host in self.hosts))

    async def _poll(self, host: Host, tags: bool) -> None:
        try:
            ps = await self.fetch(host, "/api/ps")
            if tags:
                listing = await self.fetch(host, "/api/tags")
                host.models = frozenset(_names(listing))
                host.tags_due = False
        except (httpx.TransportError, ValueError, TimeoutError) as exc:
            host.failed(f"{type(exc).__name__}: {exc}")
            return
        except Exception:  # a bug of ours must not stop the poller: the host keeps its last known state
            log.exception("polling %s failed inside otellama", host.name)
            return
        host.answered()
        host.loaded = _loaded(ps)
        host.learned.clear()
        host.polled_at = time.monotonic()

    async def fetch(self, host: Host, path: str) -> Any:
        """``GET path`` on ``host``, its JSON answer (raises ValueError on anything but 200 and JSON)."""
        request = self.client.build_request("GET", host.url(path.encode()))
        response = await self.client.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise ValueError(f"{path} answered HTTP {response.status_code}")
            body = bytearray()
            async with asyncio.timeout(POLL_TIMEOUT):
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > ANSWER_LIMIT:
                        raise ValueError(f"{path} answered more than {ANSWER_LIMIT} bytes")
            return orjson.loads(body)
        finally:
            await response.aclose()

    def states(self) -> list[HostState]:
        """Every host's snapshot, for the gauges. Safe to call from any thread.

        A single host is polled here, when its snapshot is older than the poll interval and it has answered a
        model request: the answer shows at the next read (one scrape late), and no timer polls an Ollama
        nobody is watching.
        """
        if not self.routing and not self._closed and self._loop is not None and not self._loop.is_closed():
            host = self.hosts[0]
            stale = host.polled_at is None or time.monotonic() - host.polled_at >= self.poll_interval
            if stale and host.served:
                with contextlib.suppress(RuntimeError):  # the loop is closing
                    self._loop.call_soon_threadsafe(self._refresh)
        return [host.state(named=self.routing) for host in self.hosts]

    def _refresh(self) -> None:
        if self._closed:
            return  # the final metric export at shutdown reads the gauges after the client is closed
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self.poll())

    async def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        await self.client.aclose()


def _models(answer: Any) -> list[dict[str, Any]]:
    if not isinstance(answer, dict) or not isinstance(answer.get("models"), list):
        raise ValueError("not an Ollama model list")
    return [
        entry
        for entry in answer["models"][:MODEL_LIMIT]
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and len(entry["name"]) <= NAME_LIMIT
    ]


def _names(answer: Any) -> list[str]:
    return [model_key(entry["name"]) for entry in _models(answer)]


def _loaded(answer: Any) -> dict[str, LoadedModel]:
    now = dt.datetime.now(dt.UTC)
    loaded: dict[str, LoadedModel] = {}
    for entry in _models(answer):
        size, vram = entry.get("size"), entry.get("size_vram")
        expires_in = 0.0
        with contextlib.suppress(TypeError, ValueError):
            expires_in = max(0.0, (dt.datetime.fromisoformat(entry["expires_at"]) - now).total_seconds())
        key = model_key(entry["name"])
        loaded[key] = LoadedModel(
            name=key,
            size=size if isinstance(size, int) and size >= 0 else 0,
            size_vram=vram if isinstance(vram, int) and vram >= 0 else 0,
            expires_in=expires_in,
        )
    return loaded
