"""The official ``ollama`` and ``openai`` clients get the same results through otellama as directly."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from otellama.app import create_app
from otellama.emulator import EmulatorSettings, create_emulator
from otellama.server import BackgroundServer
from otellama.settings import Settings, Upstream

MODEL = "llama3.2:3b"
EMBED_MODEL = "nomic-embed-text"
# What differs between two identical calls made a moment apart: clocks, durations and generated ids.
VOLATILE = {
    "created_at",
    "created",
    "id",
    "total_duration",
    "load_duration",
    "prompt_eval_duration",
    "eval_duration",
    "expires_at",
    "modified_at",
}


def _stable(value: Any) -> Any:
    """A client result with the volatile fields removed, as plain data."""
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list | tuple):
        return [_stable(v) for v in value]
    return value


@pytest.fixture(scope="module")
def urls() -> Iterator[tuple[str, str]]:
    """(Ollama's URL, otellama's URL): the emulator, and otellama in front of it."""
    emulator = create_emulator(EmulatorSettings(token_rate=0, load_seconds=0.01))
    with (
        BackgroundServer(emulator) as upstream,
        BackgroundServer(create_app(Settings(upstream=Upstream.parse(upstream.url), log_file=None))) as proxy,
    ):
        yield upstream.url, proxy.url


def _call(url: str, call: Callable[[ollama.Client], Any]) -> Any:
    with ollama.Client(host=url) as client:
        return _stable(call(client))


def _both(urls: tuple[str, str], call: Callable[[ollama.Client], Any]) -> tuple[Any, Any]:
    return _call(urls[0], call), _call(urls[1], call)


CHAT = [{"role": "user", "content": "Why is the sky blue?"}]
OLLAMA_CALLS: dict[str, Callable[[ollama.Client], Any]] = {
    "generate": lambda c: c.generate(model=MODEL, prompt="Name three colours.", options={"seed": 7}),
    "generate streamed": lambda c: list(c.generate(model=MODEL, prompt="Count.", stream=True)),
    "chat": lambda c: c.chat(model=MODEL, messages=CHAT),
    "chat streamed": lambda c: list(c.chat(model=MODEL, messages=CHAT, stream=True)),
    "chat with thinking": lambda c: list(c.chat(model="qwen3:14b", messages=CHAT, think=True, stream=True)),
    "embed": lambda c: c.embed(model=EMBED_MODEL, input=["one", "two"]),
    "list": lambda c: c.list(),
    "show": lambda c: c.show(MODEL),
    "ps": lambda c: c.ps(),
    "pull with progress": lambda c: list(c.pull("gemma3:1b", stream=True)),
}


@pytest.mark.parametrize("name", list(OLLAMA_CALLS))
def test_ollama_client(urls: tuple[str, str], name: str) -> None:
    direct, proxied = _both(urls, OLLAMA_CALLS[name])
    assert proxied == direct
    assert proxied  # a call that returned nothing would make the comparison hollow


def test_ollama_client_copy_delete_and_blobs(urls: tuple[str, str], tmp_path: Path) -> None:
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"\x00model bytes\x01" * 10_000)
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    errors = []
    for i, url in enumerate(urls):
        with ollama.Client(host=url) as client:
            assert client.copy(MODEL, f"copy-{i}:latest").status == "success"
            assert f"copy-{i}:latest" in [m.model for m in client.list().models]
            assert client.delete(f"copy-{i}:latest").status == "success"
            assert client.create_blob(blob) == digest
            with pytest.raises(ollama.ResponseError) as error:
                client.delete("never-existed")
            errors.append((error.value.status_code, error.value.error))
    assert errors[0] == errors[1]
    assert errors[0][0] == 404


def test_ollama_client_error_for_unknown_model(urls: tuple[str, str]) -> None:
    errors = []
    for url in urls:
        with ollama.Client(host=url) as client, pytest.raises(ollama.ResponseError) as error:
            client.generate(model="no-such-model", prompt="hi")
        errors.append((error.value.status_code, error.value.error))
    assert errors[0] == errors[1]
    assert errors[0][0] == 404


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="ollama", max_retries=0)


OPENAI_CALLS: dict[str, Callable[[openai.OpenAI], Any]] = {
    "chat": lambda c: c.chat.completions.create(model=MODEL, messages=CHAT),  # type: ignore[arg-type]
    "chat streamed": lambda c: list(
        c.chat.completions.create(
            model=MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    ),
    "embeddings": lambda c: c.embeddings.create(model=EMBED_MODEL, input=["one", "two"]),
    "models": lambda c: list(c.models.list()),
}


@pytest.mark.parametrize("name", list(OPENAI_CALLS))
def test_openai_client(urls: tuple[str, str], name: str) -> None:
    results = []
    for url in urls:
        with _openai(url) as client:
            results.append(_stable(OPENAI_CALLS[name](client)))
    direct, proxied = results
    assert proxied == direct
    assert proxied


def test_openai_client_error_for_unknown_model(urls: tuple[str, str]) -> None:
    errors = []
    for url in urls:
        with _openai(url) as client, pytest.raises(openai.NotFoundError) as error:
            client.chat.completions.create(model="no-such-model", messages=CHAT)  # type: ignore[arg-type]
        errors.append(error.value.body)
    assert errors[0] == errors[1]
