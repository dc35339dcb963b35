"""The byte path: a client's request in, the same request out to Ollama, its bytes back as they come.

``forward`` is the ASGI app that relays each exchange, ``transport`` the HTTP/1.1 client that carries it to
Ollama, ``connection`` the guarded protocol on the client's socket, ``auth`` the optional API-key gate,
``errors`` the error answers otellama gives in each API's own shape. With several Ollama hosts, ``hosts``
keeps what each holds (polled), ``router`` decides where each request goes and merges the listings, and
``routing`` is the proxy that follows those decisions.

May import: :mod:`otellama.exchange`, :mod:`otellama.settings`, the standard library, starlette, uvicorn,
httpx and httptools. Never OpenTelemetry, :mod:`otellama.sinks`, :mod:`otellama.tools`,
:mod:`otellama.emulator` or :mod:`otellama.demo`: what the proxy saw goes to telemetry only through the
:class:`~otellama.exchange.Recorder` it is handed.
"""
