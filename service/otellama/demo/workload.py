"""The demo workload: the models, prompts, client names and fault that ``otellama demo`` and the traffic
generator both send, so that the tour and the demo stack's dashboards show the same kinds of exchange.

The two drive it differently (the tour through the official ``ollama`` client, one scripted step after
another; the traffic generator over plain HTTP, an endless weighted mix), but what they ask for is defined
once, here.
"""

from __future__ import annotations

from typing import Final

from otellama.emulator import FAULT_HEADER, FAULT_MIDSTREAM_ERROR

CHAT_MODEL: Final = "llama3.2:3b"
SMALL_MODEL: Final = "gemma3:1b"
#: The chat models the traffic picks among; the first two are the tour's.
CHAT_MODELS: Final = (CHAT_MODEL, SMALL_MODEL, "qwen3:14b")
EMBED_MODEL: Final = "nomic-embed-text"
#: Asked for to provoke Ollama's 404.
UNKNOWN_MODEL: Final = "no-such-model"
EMBED_INPUT: Final = ("first text", "second text")

# What each kind of call asks. The emulator makes its answers up, but a prompt's length sets its tokens.
QUESTION: Final = "Why is the sky blue? Explain it to a curious ten-year-old."
SHORT_PROMPT: Final = "Name a colour."
CHAT_PROMPT: Final = "Tell me a joke about proxies."
GREETING: Final = "Hi!"

CLIENT_HEADER: Final = "X-Client-Name"
#: Who the workload pretends to be; None sends no client header at all.
CLIENTS: Final = ("open-webui", "langchain-app", "notebook", None)
#: The emulator's fault header: the stream fails midway. A real Ollama ignores it and simply answers.
MIDSTREAM_FAULT: Final = {FAULT_HEADER: FAULT_MIDSTREAM_ERROR}

#: Streams sent at once to one model: more than the emulator's slots for it, so that some queue.
CONCURRENT: Final = 6
#: Lines (or chunks) a hanging-up client reads before it closes the stream.
LINES_BEFORE_HANGUP: Final = 2
#: The tour's steady phase: this many requests, from this many clients at once.
STEADY, STEADY_CLIENTS = 24, 4


def client_headers(client: str | None) -> dict[str, str]:
    """The headers that say who is calling: none for an anonymous client."""
    return {CLIENT_HEADER: client} if client else {}
