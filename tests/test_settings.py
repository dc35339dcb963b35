"""Settings: the OLLAMA_HOST forms, the environment, and flags that win over it."""

from __future__ import annotations

import pytest

from otellama.settings import Settings, SettingsError, Upstream


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:11434"),
        ("ollama", "http://ollama:11434"),
        ("ollama:11500", "http://ollama:11500"),
        ("http://ollama", "http://ollama:80"),
        ("https://ollama.example", "https://ollama.example:443"),
        ("http://10.0.0.5:11434/", "http://10.0.0.5:11434"),
        ("http://gpu-box:8080/ollama", "http://gpu-box:8080/ollama"),
        ("0.0.0.0", "http://127.0.0.1:11434"),  # where Ollama listens is not where to connect
        ("[::1]:11434", "http://[::1]:11434"),
        ("  127.0.0.1:11434  ", "http://127.0.0.1:11434"),
    ],
)
def test_upstream_accepts_every_ollama_host_form(value: str, url: str) -> None:
    assert Upstream.parse(value).url == url


@pytest.mark.parametrize("value", ["", "ftp://x", "host:notaport", "host:99999"])
def test_bad_upstream_is_a_clear_error(value: str) -> None:
    with pytest.raises(SettingsError):
        Upstream.parse(value)


def test_host_header_is_the_upstream_address() -> None:
    assert Upstream.parse("ollama:11500").host_header == b"ollama:11500"


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert (settings.host, settings.port, settings.upstream.url) == (
        "127.0.0.1",
        11435,
        "http://127.0.0.1:11434",
    )
    assert settings.read_timeout is None  # model loads and pulls take minutes before the first byte


def test_environment_then_flags() -> None:
    env = {
        "OTELLAMA_HOST": "0.0.0.0",
        "OTELLAMA_PORT": "9000",
        "OTELLAMA_UPSTREAM": "gpu:11434",
        "OTELLAMA_READ_TIMEOUT": "30",
        "OTELLAMA_CONNECT_TIMEOUT": "off",
    }
    settings = Settings.from_env(env)
    assert (settings.host, settings.port, settings.upstream.url) == ("0.0.0.0", 9000, "http://gpu:11434")
    assert (settings.read_timeout, settings.connect_timeout) == (30.0, None)
    flagged = Settings.from_env(env, host="127.0.0.1", port=None, upstream="other:1")
    assert (flagged.host, flagged.port, flagged.upstream.url) == ("127.0.0.1", 9000, "http://other:1")


@pytest.mark.parametrize(
    ("name", "value"),
    [("OTELLAMA_PORT", "eleven"), ("OTELLAMA_READ_TIMEOUT", "soon"), ("OTELLAMA_CONNECT_TIMEOUT", "-1")],
)
def test_bad_environment_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})
