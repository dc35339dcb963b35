"""Every setting otellama reads, in one place.

Each setting has one environment variable; command-line flags override the environment. The standard
``OTEL_*`` variables are read by :mod:`otellama.sinks.otel` (and the SDK) as users know them and are not
repeated here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_UPSTREAM = "http://127.0.0.1:11434"
# An upstream's name goes into metric attributes and a request header: short and plain.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class UserError(Exception):
    """Something the user can fix (a setting, a time, a file); the message says what to do.

    The ``otellama`` command prints it and exits with 2, without a traceback.
    """


class SettingsError(UserError, ValueError):
    """A setting has a value otellama cannot use; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class Upstream:
    """Where Ollama listens, normalised from any form ``OLLAMA_HOST`` accepts."""

    scheme: str
    host: str
    port: int
    path: str = ""
    #: What records, metrics and ``X-Otellama-Upstream`` call this host; empty means :attr:`netloc`.
    given_name: str = ""

    @classmethod
    def parse(cls, value: str) -> Upstream:
        """Parse ``host``, ``host:port`` or ``scheme://host[:port][/path]`` the way Ollama's clients do,
        optionally named: ``gpu1=http://gpu1.internal:11434``.

        Without a scheme the port defaults to 11434; ``http://`` and ``https://`` default to 80 and 443,
        as in Ollama's own ``envconfig.Host``.
        """
        name, sep, rest = value.strip().partition("=")
        # No address form has "=" before its host, so a name is whatever comes before the first one.
        if sep and _NAME.fullmatch(name.strip()):
            return dataclasses.replace(cls.parse(rest), given_name=name.strip())
        if sep:
            raise SettingsError(
                f"upstream {value!r}: a name is letters, digits, '.', '_' or '-' (at most 64), then '='"
            )
        text = value.strip()
        if not text:
            raise SettingsError("the upstream address is empty")
        scheme, sep, _ = text.partition("://")
        default_port = 11434
        if not sep:
            scheme, text = "http", f"http://{text}"
        elif scheme in ("http", "https"):
            default_port = 80 if scheme == "http" else 443
        else:
            raise SettingsError(f"upstream {value!r}: only http:// and https:// are supported")
        parts = urlsplit(text)
        host = parts.hostname or "127.0.0.1"
        try:
            port = parts.port or default_port
        except ValueError as exc:
            raise SettingsError(f"upstream {value!r}: {exc}") from None
        # 0.0.0.0 is where Ollama listens, not an address to connect to.
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return cls(scheme=scheme, host=host, port=port, path=parts.path.rstrip("/"))

    @property
    def name(self) -> str:
        """The host's name: the one given, else ``host:port``."""
        return self.given_name or self.netloc

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"

    @property
    def host_header(self) -> bytes:
        """The ``Host`` header Ollama accepts: its own address (it answers 403 to unknown hosts)."""
        return self.netloc.encode("latin-1")


def _seconds(name: str, raw: str | None) -> float | None:
    if raw is None or raw.strip().lower() in ("", "none", "off", "0"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise SettingsError(f"{name}={raw!r} must not be negative")
    return value


def _count(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < 0:
        raise SettingsError(f"{name}={raw!r} must not be negative")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a yes/no value (true, false, 1, 0, on, off)")


def otel_flag(environ: Mapping[str, str], name: str) -> bool:
    """A boolean ``OTEL_*`` variable as the OpenTelemetry SDK reads it: ``true`` in any case is true,
    anything else (``1`` and ``yes`` included) false, so that otellama and the SDK never disagree."""
    return environ.get(name, "").strip().lower() == "true"


def _port(name: str, raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"{name}={raw!r} is not a port number")
    return port


@dataclasses.dataclass(frozen=True)
class Settings:
    """The proxy's configuration. Build it with :meth:`from_env`; tests construct it directly."""

    host: str = "127.0.0.1"
    port: int = 11435
    upstream: Upstream = dataclasses.field(default_factory=lambda: Upstream.parse(DEFAULT_UPSTREAM))
    #: Several Ollama hosts behind one address (``--upstream`` repeated, or a comma-separated
    #: ``OTELLAMA_UPSTREAM``); empty means :attr:`upstream` alone. When given, :attr:`upstream` is the first.
    upstreams: tuple[Upstream, ...] = ()
    #: Seconds between asking each host what it has loaded (``/api/ps``); ``/api/tags`` every
    #: :data:`TAGS_EVERY` polls. Only with several hosts: one host needs no routing (its gauges are
    #: refreshed when they are read).
    poll_interval: float = 5.0
    #: Seconds to wait for a TCP connection to Ollama before answering 502.
    connect_timeout: float | None = 10.0
    #: Longest silence from Ollama before answering 504. None: wait forever, as model loads and pulls
    #: legitimately take minutes before the first byte.
    read_timeout: float | None = None
    #: Seconds between upstream health probes reported by ``/otellama/health``.
    probe_interval: float = 15.0
    #: The JSONL log of exchanges; None when ``OTELLAMA_LOG_FILE=off``.
    log_file: Path | None = Path("logs/otellama.jsonl")
    #: Size at which the log rotates, and how many rotated files are kept.
    log_max_bytes: int = 50_000_000
    log_backups: int = 5
    #: Request header whose value names the client in records and metrics.
    client_header: str = "x-client-name"
    #: A ``load_duration`` above this many seconds is a cold start (a loaded model still reports a few ms).
    cold_start_seconds: float = 1.0
    #: API keys (``name:key`` per line, see :mod:`otellama.proxy.auth`). None: no keys, every request is let
    #: through.
    api_keys_file: Path | None = None
    #: With keys on: pass the client's ``Authorization`` header on to Ollama (default: it stops here).
    forward_authorization: bool = False
    #: With keys on: ``/otellama/*`` (but ``/otellama/health``) needs a key too.
    protect_admin: bool = True
    #: Longest a client may take to send its request headers, or stay silent while sending its body,
    #: before its connection is closed (slow clients); None: wait forever. Never applies to Ollama.
    client_timeout: float | None = 60.0
    #: On SIGTERM, seconds running requests get to finish before they are cut (0: cut them at once);
    #: None (``none``): wait for them all.
    shutdown_grace: float | None = 30.0

    def __post_init__(self) -> None:
        if self.upstreams:
            object.__setattr__(self, "upstream", self.upstreams[0])
            names = [upstream.name for upstream in self.upstreams]
            if len(set(names)) != len(names):
                raise SettingsError(f"upstream names must differ: {', '.join(names)}")
        if self.poll_interval <= 0:
            raise SettingsError("OTELLAMA_POLL_INTERVAL must be more than 0 seconds")

    @property
    def hosts(self) -> tuple[Upstream, ...]:
        """Every Ollama host, in the order given (one, unless several were configured)."""
        return self.upstreams or (self.upstream,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``OTELLAMA_*`` variables, then apply ``overrides`` (from flags) that are not None."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if "OTELLAMA_HOST" in env:
            values["host"] = env["OTELLAMA_HOST"]
        if "OTELLAMA_PORT" in env:
            values["port"] = _port("OTELLAMA_PORT", env["OTELLAMA_PORT"])
        if "OTELLAMA_UPSTREAM" in env:
            values.update(_upstreams(env["OTELLAMA_UPSTREAM"].split(",")))
        if "OTELLAMA_POLL_INTERVAL" in env:
            poll = _seconds("OTELLAMA_POLL_INTERVAL", env["OTELLAMA_POLL_INTERVAL"])
            if poll is None:
                raise SettingsError("OTELLAMA_POLL_INTERVAL must be more than 0 seconds")
            values["poll_interval"] = poll
        if "OTELLAMA_CONNECT_TIMEOUT" in env:
            values["connect_timeout"] = _seconds("OTELLAMA_CONNECT_TIMEOUT", env["OTELLAMA_CONNECT_TIMEOUT"])
        if "OTELLAMA_READ_TIMEOUT" in env:
            values["read_timeout"] = _seconds("OTELLAMA_READ_TIMEOUT", env["OTELLAMA_READ_TIMEOUT"])
        if "OTELLAMA_LOG_FILE" in env:
            raw = env["OTELLAMA_LOG_FILE"].strip()
            values["log_file"] = None if raw.lower() in ("off", "none", "") else Path(raw)
        if "OTELLAMA_LOG_MAX_BYTES" in env:
            values["log_max_bytes"] = _count("OTELLAMA_LOG_MAX_BYTES", env["OTELLAMA_LOG_MAX_BYTES"])
        if "OTELLAMA_LOG_BACKUPS" in env:
            values["log_backups"] = _count("OTELLAMA_LOG_BACKUPS", env["OTELLAMA_LOG_BACKUPS"])
        if "OTELLAMA_CLIENT_HEADER" in env:
            values["client_header"] = env["OTELLAMA_CLIENT_HEADER"].strip().lower()
        if "OTELLAMA_COLD_START_SECONDS" in env:
            cold = _seconds("OTELLAMA_COLD_START_SECONDS", env["OTELLAMA_COLD_START_SECONDS"])
            values["cold_start_seconds"] = cold or 0.0
        if "OTELLAMA_API_KEYS_FILE" in env:
            raw = env["OTELLAMA_API_KEYS_FILE"].strip()
            values["api_keys_file"] = Path(raw) if raw else None
        if "OTELLAMA_FORWARD_AUTHORIZATION" in env:
            raw = env["OTELLAMA_FORWARD_AUTHORIZATION"]
            values["forward_authorization"] = _flag("OTELLAMA_FORWARD_AUTHORIZATION", raw)
        if "OTELLAMA_PROTECT_ADMIN" in env:
            values["protect_admin"] = _flag("OTELLAMA_PROTECT_ADMIN", env["OTELLAMA_PROTECT_ADMIN"])
        if "OTELLAMA_CLIENT_TIMEOUT" in env:
            values["client_timeout"] = _seconds("OTELLAMA_CLIENT_TIMEOUT", env["OTELLAMA_CLIENT_TIMEOUT"])
        grace = env.get("OTELLAMA_SHUTDOWN_GRACE", "").strip().lower()
        if grace:
            # Unlike the timeouts, 0 here means "no grace at all"; only "none" means "wait forever".
            values["shutdown_grace"] = (
                None if grace == "none" else _seconds("OTELLAMA_SHUTDOWN_GRACE", grace) or 0.0
            )
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "upstream" and isinstance(value, str):
                value = [value]
            if key == "upstream" and isinstance(value, list):
                values.pop("upstreams", None)
                values.update(_upstreams(value))
            else:
                values[key] = value
        return cls(**values)


#: ``/api/tags`` (which models each host has) is asked every this many ``/api/ps`` polls, and at once
#: when a host answers "model not found".
TAGS_EVERY = 6


def _upstreams(values: list[str]) -> dict[str, Any]:
    """``upstream`` (and ``upstreams`` when there are several) from one or more addresses."""
    parsed = tuple(Upstream.parse(value) for value in values if value.strip())
    if not parsed:
        raise SettingsError("the upstream address is empty")
    if len(parsed) == 1:
        return {"upstream": parsed[0]}
    return {"upstream": parsed[0], "upstreams": parsed}
