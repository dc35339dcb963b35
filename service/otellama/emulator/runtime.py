"""The emulator's model runtime: installed models, loading, slots, the queue, keep-alive, and the run itself.

Every inference request walks through the phases of a real model run, and each duration it reports is the
wall time that phase actually took here::

    arrival ─── load ─── wait for a slot ─── prompt eval ─── tokens ─── done
    |<─ load_duration ─>|                    |<─ prompt_eval ─>|<─ eval ─>|
    |<─────────────────────────── total_duration ────────────────────────>|

so ``total - load - prompt_eval - eval`` is exactly the time the request spent queued. The first request for a
model pays ``load_seconds``; the model then stays loaded until its keep-alive expires after its last request.
``token_rate`` paces the tokens (and prompt evaluation, ``_PROMPT_SPEEDUP`` times faster); ``token_rate=0``
removes every sleep but the cold load, which makes the emulator a fast upstream for benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import timedelta
from typing import Any, Final

from otellama.emulator.catalogue import Card, model_key
from otellama.emulator.exchange import JSON_UTF8, Exchange, HTTPError
from otellama.emulator.settings import (
    BUSY_MESSAGE,
    FAULT_HEADER,
    FAULT_MIDSTREAM_ERROR,
    MIDSTREAM_MESSAGE,
    EmulatorSettings,
)
from otellama.emulator.wire import Format, Plan, Run

# Prompt tokens go through the model in batches, far faster than tokens are generated one by one.
_PROMPT_SPEEDUP: Final = 20
# What assigning an already loaded model costs a real server; only simulated when pacing is on.
_WARM_LOAD_SECONDS: Final = 0.003
_CHUNKS_BEFORE_FAULT: Final = 3
# A flood (token_rate=0) never sleeps; yielding now and then keeps one long stream from starving the others.
_FLOOD_YIELD_EVERY: Final = 32
# How often a load waiting for room (max_loaded) looks again.
_ROOM_POLL_SECONDS: Final = 0.005


@dataclasses.dataclass(frozen=True)
class Cancellation:
    """A request whose client went away before its response was complete.

    ``at`` is ``time.monotonic()`` when the emulator noticed; ``chunks_sent`` counts body writes before that.
    """

    path: str
    model: str
    at: float
    chunks_sent: int


async def sleep_until(deadline: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``deadline``.

    uvloop's timers run on a cached, millisecond clock and can fire a little early; a simulated phase must
    never report less than it was configured to take.
    """
    remaining = deadline - time.monotonic()
    while remaining > 0:
        await asyncio.sleep(remaining)
        remaining = deadline - time.monotonic()


class Model:
    """An installed model and whether it is loaded.

    A model is pinned (``refs > 0``) while requests use it, and expires ``session`` seconds after the last
    one lets go, the way Ollama's scheduler keeps runners.
    """

    def __init__(self, card: Card, parallel: int, keep_alive: float) -> None:
        self.card = card
        self.loaded = False
        self.loading: asyncio.Future[None] | None = None
        self.refs = 0
        self.session = keep_alive
        self.expires = 0.0
        self.slots = asyncio.Semaphore(parallel)

    def expire_if_due(self) -> None:
        if self.loaded and self.refs == 0 and time.monotonic() >= self.expires:
            self.loaded = False

    def pin(self, keep_alive: float) -> None:
        self.expire_if_due()
        self.session = keep_alive
        self.refs += 1

    def unpin(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.release()

    def release(self) -> None:
        """Start the keep-alive countdown (a load still in flight starts it when it completes)."""
        self.expires = time.monotonic() + self.session
        if self.session == 0:
            self.loaded = False


class Runtime:
    """The emulated server's state and its model runtime, which every route works through.

    It keeps the installed models and uploaded blobs, admits model runs (503 past ``parallel + max_queue``),
    loads models once and keeps them for their keep-alive, hands out each model's ``parallel`` slots,
    paces tokens, and runs a plan to its final chunk. :attr:`cancellations` lists requests whose client
    went away mid-response.
    """

    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.cancellations: list[Cancellation] = []
        self.blobs: set[str] = set()
        self.models: dict[str, Model] = {}
        self._in_flight = 0
        for age, name in enumerate(settings.models):
            card = Card.guess(name)
            # Listed newest first, in the order given.
            self.add(dataclasses.replace(card, modified_at=card.modified_at - timedelta(hours=age)))

    @property
    def in_flight(self) -> int:
        """Model runs admitted (running, loading or queued) and not yet finished."""
        return self._in_flight

    def add(self, card: Card) -> None:
        """Install a model (replacing one of the same name), not loaded."""
        self.models[model_key(card.name)] = Model(card, self.settings.parallel, self.settings.keep_alive)

    def find(self, name: str) -> Model:
        """The installed model of that name, matched as Ollama matches; else Ollama's 400 or 404."""
        if not name:
            raise HTTPError(400, "model is required")
        model = self.models.get(model_key(name))
        if model is None:
            raise HTTPError(404, f'model "{name}" not found, try pulling it first')
        return model

    def listing(self) -> list[Card]:
        """The installed models, newest first."""
        return sorted(
            (model.card for model in self.models.values()), key=lambda card: card.modified_at, reverse=True
        )

    async def guarded(self, exchange: Exchange, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` until it finishes or the client disconnects, whichever comes first.

        uvicorn silently drops writes to a closed connection, so a generation never learns of a departed
        client from ``send``; only ``receive`` tells. Ollama stops generating as soon as its request context
        is cancelled, and so does this.
        """
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._watch(exchange))
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                # Let the run's own cleanup (slot, model pin, in-flight count) happen before we return.
                await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled():
            task.result()

    async def _watch(self, exchange: Exchange) -> None:
        while (await exchange.receive())["type"] != "http.disconnect":
            pass
        # uvicorn also reports "disconnect" once the response is complete; that is no cancellation.
        if not exchange.finished:
            self.cancellations.append(
                Cancellation(exchange.path, exchange.model, time.monotonic(), exchange.chunks_sent)
            )

    @contextlib.asynccontextmanager
    async def scheduled(
        self, exchange: Exchange, model: Model, keep_alive: float | None
    ) -> AsyncIterator[None]:
        """Admit a request, load its model, then hold one of the model's ``parallel`` slots."""
        if self._in_flight >= self.settings.parallel + self.settings.max_queue:
            raise HTTPError(503, BUSY_MESSAGE)
        self._in_flight += 1
        model.pin(self.settings.keep_alive if keep_alive is None else keep_alive)
        try:
            await self._load(model)
            exchange.loaded_ns = time.monotonic_ns()
            async with model.slots:
                exchange.slot_ns = time.monotonic_ns()
                yield
        finally:
            self._in_flight -= 1
            model.unpin()

    async def _load(self, model: Model) -> None:
        if model.loaded:
            if self.settings.token_rate > 0:
                await asyncio.sleep(_WARM_LOAD_SECONDS)
            return
        if model.loading is None:
            model.loading = asyncio.ensure_future(self._cold_load(model))
        # Shielded: a loading model keeps loading when the client that asked for it goes away, as in Ollama.
        await asyncio.shield(model.loading)

    async def _make_room(self, model: Model) -> None:
        """With ``max_loaded`` set, unload the least recently used idle model until ``model`` fits."""
        limit = self.settings.max_loaded
        while limit:
            others = [m for m in self.models.values() if m is not model and (m.loaded or m.loading)]
            for other in others:
                other.expire_if_due()
            resident = [m for m in others if m.loaded or m.loading]
            if len(resident) < limit:
                return
            idle = [m for m in resident if m.loaded and m.refs == 0]
            if idle:
                min(idle, key=lambda m: m.expires).loaded = False
                continue
            await asyncio.sleep(_ROOM_POLL_SECONDS)  # every runner is busy: wait for one to finish, as Ollama

    async def _cold_load(self, model: Model) -> None:
        try:
            await self._make_room(model)
            await sleep_until(time.monotonic() + self.settings.load_seconds)
            model.loaded = True
            if model.refs == 0:
                model.release()
        finally:
            model.loading = None

    async def pace(self, start: float, tokens: int, index: int) -> None:
        """Sleep until ``tokens`` tokens are due, on an absolute schedule so the rate does not drift."""
        rate = self.settings.token_rate
        if rate > 0:
            await sleep_until(start + tokens / rate)
        elif index % _FLOOD_YIELD_EVERY == _FLOOD_YIELD_EVERY - 1:
            await asyncio.sleep(0)

    async def evaluate_prompt(self, tokens: int) -> None:
        if self.settings.token_rate > 0:
            await sleep_until(time.monotonic() + tokens / (self.settings.token_rate * _PROMPT_SPEEDUP))

    def _metrics(
        self, exchange: Exchange, eval_start: int, prompt_tokens: int, eval_count: int
    ) -> dict[str, int]:
        end = time.monotonic_ns()
        # A phase that took under a nanosecond still happened; Ollama never reports a warm load as zero.
        load = max(1, exchange.loaded_ns - exchange.start_ns)
        prompt = max(1, eval_start - exchange.slot_ns)
        generation = max(1, end - eval_start) if eval_count else 0
        fields = {
            "total_duration": max(end - exchange.start_ns, load + prompt + generation),
            "load_duration": load,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": prompt,
            "eval_count": eval_count,
            "eval_duration": generation,
        }
        return {key: value for key, value in fields.items() if value}

    async def run(
        self,
        exchange: Exchange,
        model: Model,
        keep_alive: float | None,
        plan: Plan,
        fmt: Format,
        stream: bool,
    ) -> None:
        """One model run from admission to the final chunk (or the non-streamed body)."""
        faulty = exchange.header(FAULT_HEADER) == FAULT_MIDSTREAM_ERROR
        pieces = plan.pieces[:_CHUNKS_BEFORE_FAULT] if faulty else plan.pieces
        exchange.stream_type = fmt.stream_type
        async with self.scheduled(exchange, model, keep_alive):
            await self.evaluate_prompt(plan.prompt_tokens)
            eval_start = time.monotonic_ns()
            start, produced = time.monotonic(), 0
            content: list[str] = []
            thinking: list[str] = []
            calls: list[dict[str, Any]] = []
            for index, piece in enumerate(pieces):
                produced += piece.tokens
                await self.pace(start, produced, index)
                if stream:
                    await exchange.write(fmt.chunk(piece))
                elif piece.call is not None:
                    calls.append(piece.call)
                else:
                    (thinking if piece.kind == "thinking" else content).append(piece.text)
            if faulty:
                if not stream:
                    raise HTTPError(500, MIDSTREAM_MESSAGE)
                await exchange.finish(fmt.stream_error(MIDSTREAM_MESSAGE))
                return
            metrics = self._metrics(exchange, eval_start, plan.prompt_tokens, plan.eval_count)
            run = Run(plan, "".join(content), "".join(thinking), calls, metrics)
            if stream:
                await exchange.finish(fmt.final(run))
            else:
                await exchange.respond(200, fmt.body_type, fmt.body(run))

    async def load_only(
        self, exchange: Exchange, model: Model, keep_alive: float | None, body: bytes
    ) -> None:
        """An empty prompt or message list: load the model, answer ``done_reason: "load"`` with no timings."""
        async with self.scheduled(exchange, model, keep_alive):
            pass
        await exchange.respond(200, JSON_UTF8, body)

    def unload(self, model: Model) -> None:
        model.expire_if_due()
        model.session = 0
        if model.refs == 0:
            model.loaded = False
