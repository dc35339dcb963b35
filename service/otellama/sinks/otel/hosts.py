"""The per-host gauges: is each Ollama host up, how many requests otellama has open to it, and what it
has loaded (per model: loaded or not, bytes in memory and in VRAM, seconds until unloaded).

Their attributes are the per-request metrics' own: ``otellama.upstream`` (only with several upstreams) and the
model as ``gen_ai.request.model`` (the name requests use for it), so that a dashboard filters both alike.

They are observable gauges, read from :class:`~otellama.exchange.HostState` snapshots when metrics are
collected (a Prometheus scrape, an OTLP export). The snapshots come from a callable that ``app.py`` hands
over (the router's host pool), so that the sinks never import the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otellama.exchange import HostState, LoadedModel
from otellama.sinks.otel import semconv

HostStates = Callable[[], Sequence[HostState]]


class HostGauges:
    """Registers the per-host gauges on ``meter``; each gauge reads a fresh snapshot (a few small objects)."""

    def __init__(self, meter: Meter, states: HostStates) -> None:
        def gauge(
            metric: semconv.Metric, read: Callable[[Sequence[HostState]], Iterable[Observation]]
        ) -> None:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                return list(read(states()))

            meter.create_observable_gauge(
                metric.name, callbacks=[callback], unit=metric.unit, description=metric.description
            )

        gauge(semconv.UPSTREAM_UP, self._up)
        gauge(semconv.UPSTREAM_IN_FLIGHT, self._in_flight)
        gauge(semconv.MODEL_LOADED, self._loaded)
        gauge(semconv.MODEL_SIZE, lambda hosts: self._per_model(hosts, lambda m: m.size))
        gauge(semconv.MODEL_VRAM, lambda hosts: self._per_model(hosts, lambda m: m.size_vram))
        gauge(semconv.MODEL_UNLOAD_IN, lambda hosts: self._per_model(hosts, lambda m: round(m.expires_in, 3)))

    @staticmethod
    def _host(state: HostState) -> dict[str, str]:
        # One upstream: no host attribute, as on the per-request metrics (the job names the host).
        return {semconv.UPSTREAM: state.name} if state.name else {}

    def _up(self, hosts: Sequence[HostState]) -> Iterable[Observation]:
        for state in hosts:
            if state.up is not None:
                yield Observation(int(state.up), self._host(state))

    def _in_flight(self, hosts: Sequence[HostState]) -> Iterable[Observation]:
        for state in hosts:
            yield Observation(state.in_flight, self._host(state))

    def _loaded(self, hosts: Sequence[HostState]) -> Iterable[Observation]:
        for state in hosts:
            if state.polled_at is None:
                continue  # nothing known yet: no series rather than a false 0
            loaded = {model.name for model in state.loaded}
            for name in sorted(loaded | set(state.installed)):
                yield Observation(int(name in loaded), {**self._host(state), semconv.REQUEST_MODEL: name})

    def _per_model(
        self, hosts: Sequence[HostState], value: Callable[[LoadedModel], float | int]
    ) -> Iterable[Observation]:
        for state in hosts:
            for model in state.loaded:
                yield Observation(value(model), {**self._host(state), semconv.REQUEST_MODEL: model.name})
