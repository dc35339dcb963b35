"""Observation and the record: what otellama learns from the bytes it forwards. Pure: no I/O, no clock
reads but those handed in, no OpenTelemetry.

``ollama`` holds the protocol facts (endpoints, framings, timings), ``stream`` the observer of a response
body, ``request`` what a request body says, ``record`` the one :class:`~otellama.observe.record.Record` an
exchange becomes (and its JSON form), ``summary`` the statistics of many records.

May import: :mod:`otellama.exchange`, the standard library and orjson. Nothing from
:mod:`otellama.proxy`, :mod:`otellama.sinks` or :mod:`otellama.tools`.
"""
