"""``otellama demo``: the emulator and the proxy on free ports, real client calls through them, what happened.

Needs the official ``ollama`` client (``pip install 'otellama[demo]'``; ``make demo`` installs it).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from otellama.app import create_app
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream

CHAT_MODEL = "llama3.2:3b"
EMBED_MODEL = "nomic-embed-text"


@dataclasses.dataclass
class Step:
    label: str
    call: Callable[[], Any]
    outcome: str = ""


def _script(client: Any) -> list[Step]:
    def stream_generate() -> str:
        parts = [
            c["response"]
            for c in client.generate(model=CHAT_MODEL, prompt="Why is the sky blue?", stream=True)
        ]
        return f"{len(parts)} chunks: {''.join(parts)[:40]!r}…"

    def generate() -> str:
        reply = client.generate(model=CHAT_MODEL, prompt="Name a colour.")
        return f"{reply['eval_count']} tokens, load {reply['load_duration'] / 1e6:.0f} ms"

    def stream_chat() -> str:
        messages = [{"role": "user", "content": "Tell me a joke."}]
        parts = [
            c["message"]["content"] for c in client.chat(model=CHAT_MODEL, messages=messages, stream=True)
        ]
        return f"{len(parts)} chunks: {''.join(parts)[:40]!r}…"

    def chat() -> str:
        reply = client.chat(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}])
        return f"{reply['eval_count']} tokens, done_reason {reply['done_reason']}"

    def embed() -> str:
        reply = client.embed(model=EMBED_MODEL, input=["first text", "second text"])
        return f"{len(reply['embeddings'])} vectors of {len(reply['embeddings'][0])} dimensions"

    def tags() -> str:
        return ", ".join(m["model"] for m in client.list()["models"])

    def unknown() -> str:
        import ollama

        try:
            client.generate(model="no-such-model", prompt="hi")
        except ollama.ResponseError as exc:
            return f"ResponseError {exc.status_code}: {exc.error}"
        return "unexpectedly succeeded"

    return [
        Step("generate, streamed (cold start)", stream_generate),
        Step("generate", generate),
        Step("chat, streamed", stream_chat),
        Step("chat", chat),
        Step("embed", embed),
        Step("list models", tags),
        Step("unknown model", unknown),
    ]


def run(load_seconds: float = 1.5) -> int:
    """Run the demo; returns the exit code."""
    try:
        import ollama
    except ImportError:
        print("otellama demo needs the official ollama client: pip install 'otellama[demo]'", file=sys.stderr)
        return 1

    log_file = Path(tempfile.mkdtemp(prefix="otellama-demo-")) / "otellama.jsonl"
    emulator = create_emulator(EmulatorSettings(load_seconds=load_seconds, token_rate=200.0))
    with BackgroundServer(emulator) as upstream:
        settings = Settings(upstream=Upstream.parse(upstream.url), log_file=log_file)
        with BackgroundServer(create_app(settings)) as proxy:
            print(f"Ollama emulator on {upstream.url}; otellama on {proxy.url} in front of it\n")
            with ollama.Client(host=proxy.url) as client:
                for step in _script(client):
                    started = time.perf_counter()
                    step.outcome = str(step.call())
                    print(f"  {step.label:<34} {time.perf_counter() - started:6.2f} s  {step.outcome}")
    print(f"\nWhat otellama recorded ({log_file}):")
    print(
        f"  {'endpoint':<15}{'model':<18}{'status':>6}{'outcome':>9}{'total ms':>10}{'ttft ms':>9}"
        f"{'load ms':>9}{'cold':>6}{'tok/s':>8}"
    )
    for line in log_file.read_text().splitlines():
        r = json.loads(line)
        print(
            f"  {r['endpoint']:<15}{r['model'] or '-':<18}{r['status']:>6}{r['outcome']:>9}"
            f"{_cell(r['duration_ms'])}{_cell(r['ttft_ms'], 9)}{_cell(r['load_time_ms'], 9)}"
            f"{'yes' if r['cold_start'] else '':>6}{_cell(r['tokens_per_second'], 8)}"
        )
    print(
        "\nPoint a real Ollama client at otellama:\n"
        "  otellama serve --upstream 127.0.0.1:11434      # listens on 127.0.0.1:11435\n"
        "  OLLAMA_HOST=127.0.0.1:11435 ollama run llama3.2"
    )
    return 0


def _cell(value: float | None, width: int = 10) -> str:
    return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"
