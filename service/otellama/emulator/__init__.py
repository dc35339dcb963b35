"""An Ollama stand-in for the demo, the tests and the benchmark.

It answers Ollama's native and OpenAI-compatible HTTP API as the Ollama server does (docs/reference.md §1 and
the fixtures in tests/data/ollama-api): NDJSON and SSE streams, ``done: true`` finals with nanosecond timings,
zero-valued fields omitted, errors with their real status codes and body shapes. Output text is made up, but
deterministically: the same settings and request always produce the same tokens. It is never the thing under
test: where it and Ollama's documented or recorded bytes disagree, the emulator is wrong.

The request header ``X-Emulator-Fault`` injects failures: ``midstream-error`` ends a stream after a few chunks
with an ``{"error": ...}`` line (native) or event (``/v1``) and no final chunk. Other values are ignored.

Its modules, each importing only those above it in this list:

- ``settings``: :class:`EmulatorSettings` and the fixed strings (fault header, busy message, version).
- ``catalogue``: the models it knows, described from their names.
- ``exchange``: one HTTP request and its response writer, the request field readers, the error exceptions.
- ``wire``: what a model run is (plan, pieces, result) and how each API frames it (NDJSON, SSE, bodies).
- ``generation``: the made-up output of a run, decided from a seed.
- ``runtime``: installed models, loading, slots, the queue, keep-alive and the paced run (with its timings).
- ``native``, ``management``, ``v1``: the routes, as functions of the runtime and the exchange.
- ``app``: :class:`Emulator`, the ASGI application and its route table.

It may import the standard library, ``orjson`` and ``starlette.types``, and nothing of otellama's own: not
the proxy, the sinks or the tools, so that a proxy bug can never hide behind a matching emulator bug.
"""

from otellama.emulator.app import Emulator, create_emulator
from otellama.emulator.runtime import Cancellation
from otellama.emulator.settings import (
    BUSY_MESSAGE,
    DEFAULT_MODELS,
    FAULT_HEADER,
    FAULT_MIDSTREAM_ERROR,
    MIDSTREAM_MESSAGE,
    OLLAMA_VERSION,
    EmulatorSettings,
)

__all__ = [
    "BUSY_MESSAGE",
    "DEFAULT_MODELS",
    "FAULT_HEADER",
    "FAULT_MIDSTREAM_ERROR",
    "MIDSTREAM_MESSAGE",
    "OLLAMA_VERSION",
    "Cancellation",
    "Emulator",
    "EmulatorSettings",
    "create_emulator",
]
