"""The vocabulary every layer speaks: one exchange, how it ended, and the seam where telemetry hooks in.

The byte path (:mod:`otellama.proxy`) fills an :class:`Exchange` with raw facts as they happen; a
:class:`Recorder` (the sinks' fan-out, or a test's) is told when the exchange begins and answers with a
:class:`Recording`, a handle to its own per-exchange state that the proxy carries without looking inside,
and hands back the finished exchange through it. That is the whole contract between moving bytes and
observing them, as opentelemetry-util-genai's ``start`` returns an invocation that is later stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Final, Literal, Protocol

#: How an exchange ended, from the proxy's point of view (the HTTP status aside): the client got the
#: whole response; something failed (upstream, otellama, the response itself); the client left first.
Outcome = Literal["ok", "error", "cancelled"]
OK: Final = "ok"
ERROR: Final = "error"
CANCELLED: Final = "cancelled"
OUTCOMES: Final[tuple[Outcome, ...]] = (OK, ERROR, CANCELLED)
#: Each outcome as a small number, for compact columns (the stats window, the report's timeline).
OUTCOME_CODES: Final[dict[str, int]] = {name: code for code, name in enumerate(OUTCOMES)}


#: Why the router sent an exchange to its host (only with several upstreams): the model is loaded there;
#: the fewest requests in flight among the hosts that have it (or, when none has it, among all); the only
#: host that has it, or the one the request named; after the hosts before it refused the connection; after
#: the hosts before it answered "server busy" (503); or the answer was merged from every host.
Route = Literal["warm", "least_busy", "only", "failover", "spill", "all"]
ROUTES: Final[tuple[Route, ...]] = ("warm", "least_busy", "only", "failover", "spill", "all")


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """One host an exchange tried and left before the host that answered it."""

    upstream: str  # the host's name
    reason: str  # connect_error, connect_timeout, busy
    at: float  # time.perf_counter() when it gave up on that host


@dataclasses.dataclass(slots=True)
class Exchange:
    """What the proxy saw of one request and its response: raw facts, no interpretation.

    Times are ``time.perf_counter()`` readings except :attr:`started_at` (wall clock, for timestamps).
    """

    method: str
    path: str
    query: bytes
    request_headers: list[tuple[bytes, bytes]]
    started_at: float
    t_start: float
    request_body: bytes | None = None  # whole body when it fit under the proxy's capture limit
    request_size: int = 0
    status: int | None = None  # what the client got
    response_headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    t_headers: float | None = None  # upstream response headers arrived
    t_first_byte: float | None = None  # first body chunk went to the client
    t_end: float = 0.0
    response_size: int = 0
    chunks: int = 0
    outcome: Outcome = OK
    error: str | None = None  # what went wrong, in words
    error_type: str | None = None  # a short, low-cardinality class name for it
    # Set by the router, only when there are several upstreams: which host answered, and why.
    upstream: str | None = None  # the host's configured name
    upstream_address: tuple[str, int] | None = None  # its host and port
    route: Route | None = None
    retries: list[Retry] = dataclasses.field(default_factory=list)

    def response_header(self, name: bytes) -> bytes | None:
        """The first response header called ``name`` (lower case), if any."""
        for key, value in self.response_headers:
            if key.lower() == name:
                return value
        return None


class Recording(Protocol):
    """A recorder's handle on one exchange, from :meth:`Recorder.begin`. Its calls must not raise."""

    def observe(self, exchange: Exchange) -> Callable[[bytes, float], None] | None:
        """Response headers arrived; return a callback for each body chunk after it went to the client."""

    def finish(self, exchange: Exchange) -> None:
        """The client has its last byte (or left); record the exchange. Called once."""


class Recorder(Protocol):
    """Where telemetry hooks into the proxy. Its calls must not raise.

    Only :meth:`begin` and :meth:`Recording.observe` run before the client has its last byte; they must
    stay cheap (``begin`` picks the trace context that carries ``traceparent`` to Ollama). Everything
    else happens in :meth:`Recording.finish`, after the last byte.
    """

    def begin(self, exchange: Exchange) -> Recording:
        """The request arrived; nothing has been sent upstream yet."""


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    """One model a host has in memory, as its ``/api/ps`` said at the last poll."""

    name: str  # as Ollama matches it (lower case, with its tag)
    size: int  # bytes in memory in all
    size_vram: int  # of which in GPU memory
    expires_in: float  # seconds until Ollama unloads it, from the poll's time


@dataclasses.dataclass(frozen=True, slots=True)
class HostState:
    """What otellama knows about one Ollama host: the per-host gauges read it (through app.py), so that the
    sinks never import the router."""

    name: str  # its configured name; empty with one upstream (then no metric names a host)
    address: str
    port: int
    up: bool | None  # None: not known yet
    in_flight: int  # requests otellama has open to it now
    loaded: tuple[LoadedModel, ...]
    installed: tuple[str, ...]  # the models it has (/api/tags), when known
    polled_at: float | None  # time.monotonic() of the /api/ps answer ``loaded`` comes from; None: never
