"""Where a record goes: the fan-out that turns exchanges into records, and the sinks that render them.

``fanout`` is the proxy's :class:`~otellama.exchange.Recorder`: it builds one
:class:`~otellama.observe.record.Record` per exchange and hands that same value to every sink. The sinks:
``jsonlog`` (the local JSONL log), ``stats`` (the in-memory window behind ``/otellama/stats``) and ``otel``
(spans and metrics through the OpenTelemetry SDK, and ``/otellama/metrics``).

May import: :mod:`otellama.exchange`, :mod:`otellama.settings`, :mod:`otellama.observe`, the standard
library and (in ``otel`` only) OpenTelemetry. Never :mod:`otellama.proxy` (the proxy hands
exchanges over through the Recorder seam), :mod:`otellama.tools`, :mod:`otellama.emulator` or
:mod:`otellama.demo`.
"""
