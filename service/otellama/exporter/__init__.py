"""The exporter process: spans and metrics rendered from the JSONL log and sent, away from the proxy.

``otellama serve`` writes each exchange's record to the JSONL log (that line is the serialized record) and
starts ``python -m otellama exporter`` beside it. The exporter follows the log (``follow``), renders each
line's spans and metrics with the very functions the proxy used to (:mod:`otellama.sinks.otel`), exports
them, and saves its position in the log only once the collector accepted them (``process``). A collector
that is down, slow or black-holed therefore stops the position, not the proxy: nothing is lost while the
lines are in the log, and once it is back every span goes out with its original ids and timestamps. The
proxy supervises the process (``supervise``): restarts it when it dies, counts that, and on SIGTERM lets it
export to the end of the log within what is left of ``OTELLAMA_SHUTDOWN_GRACE``.

May import what :mod:`otellama.sinks` may, and :mod:`otellama.sinks`. Never :mod:`otellama.proxy` or
:mod:`otellama.tools`.
"""
