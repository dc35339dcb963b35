"""Optional API keys: who may use otellama, and whose request each one is.

With ``OTELLAMA_API_KEYS_FILE`` set, every request needs ``Authorization: Bearer <key>``, except
``GET /otellama/health`` (a liveness probe must work without secrets) and CORS preflights, which browsers
send without credentials: an ``OPTIONS`` with ``Access-Control-Request-Method`` and no body. A preflight
without a key is attributed to the client :data:`ANONYMOUS` (a name no key may have) and, like every request,
sheds any ``Authorization`` it carries; any other ``OPTIONS`` needs a key. Without a valid key the client gets
401 in the shape of the API it called: ``{"error": "..."}`` for Ollama's own, OpenAI's
``{"error": {"message", "type", "param", "code"}}`` under ``/v1/``. ``/otellama/metrics`` and
``/otellama/stats`` need a key too unless ``OTELLAMA_PROTECT_ADMIN=false``.

The keys file has one key per line, ``name:key`` or ``name key``; blank lines and lines starting with ``#``
are skipped::

    # team      key
    search-bot: 3f9c1e0b7a5d4c2e8f6a1b3c5d7e9f01
    notebooks   b2a4c6e8f0a1b3c5d7e9f1a3c5e7b9d2

A name is what the exchange is attributed to: the gate writes it into the client header
(``OTELLAMA_CLIENT_HEADER``, ``X-Client-Name`` by default) in place of whatever the client sent there, so a
client cannot claim another's name, and logs, spans and metrics show it as ``client``. Ollama receives that
header too, and never the key: ``Authorization`` stops here unless ``OTELLAMA_FORWARD_AUTHORIZATION=true``
(for an Ollama behind its own authenticating proxy). Several keys may share a name (rotation); a key may
appear once.

Keys are checked in constant time: the presented key and every known key are hashed to SHA-256 and the
digests compared with :func:`hmac.compare_digest`, against every key, with no early exit, so neither the
position of a match nor a key's length shows in the timing. Keys are never logged, and error messages about
the file name the line, not its content. The file is read once at start; restart to change keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from starlette.types import Scope, Send

from otellama.proxy.errors import error_body, json_headers
from otellama.settings import Settings, SettingsError

log = logging.getLogger(__name__)

#: Shortest key accepted. ``ollama``, the placeholder the OpenAI client needs, is no key at all.
MIN_KEY_LENGTH: Final = 16
#: Longest name: the name is a client label on every metric.
MAX_NAME_LENGTH: Final = 64
#: The one path that stays open: health checks carry no secrets.
OPEN_PATH: Final = "/otellama/health"
#: The client name of a CORS preflight without a key: fixed, so a preflight can neither claim another
#: client's name nor fill the client label's slots with invented ones. Reserved: no key may be named so.
ANONYMOUS: Final = "anonymous"
#: Where otellama's own endpoints live: the app answers these itself, the gate guards them as admin. One
#: constant for both, so what is answered and what is guarded cannot drift apart.
ADMIN_PREFIX: Final = "/otellama/"

_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@+/")

Compare = Callable[[bytes, bytes], bool]


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class Keys:
    """The known keys, kept as SHA-256 digests, each with the name it stands for."""

    def __init__(self, entries: Sequence[tuple[str, str]], *, compare: Compare = hmac.compare_digest) -> None:
        if not entries:
            raise SettingsError("no API keys given")
        self._entries = [(_digest(key.encode("ascii")), name) for name, key in entries]
        if len({digest for digest, _ in self._entries}) != len(self._entries):
            raise SettingsError("the same API key is listed twice")
        self._compare = compare

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        return sorted({name for _, name in self._entries})

    def match(self, presented: bytes) -> str | None:
        """The name of ``presented`` if it is a known key. Compares against every key, whatever matches."""
        digest = _digest(presented)
        found: str | None = None
        for known, name in self._entries:
            if self._compare(digest, known):
                found = name
        return found

    @classmethod
    def parse(cls, text: str, source: str = "the keys file") -> Keys:
        """Read the keys file format (see the module docstring). Errors name the line, never the key."""
        entries: list[tuple[str, str]] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            cut = min((i for i in (line.find(":"), _first_space(line)) if i >= 0), default=-1)
            if cut <= 0:
                raise SettingsError(f"{source}, line {number}: expected 'name:key' or 'name key'")
            name, key = line[:cut].strip(), line[cut + 1 :].strip()
            if len(name) > MAX_NAME_LENGTH or not set(name) <= _NAME_CHARS:
                raise SettingsError(
                    f"{source}, line {number}: a name is 1 to {MAX_NAME_LENGTH} letters, digits or ._-@+/"
                )
            if name == ANONYMOUS:
                raise SettingsError(
                    f"{source}, line {number}: the name {ANONYMOUS!r} is reserved for CORS preflights "
                    "without a key"
                )
            if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
                raise SettingsError(f"{source}, line {number}: a key is printable ASCII without spaces")
            if len(key) < MIN_KEY_LENGTH:
                raise SettingsError(
                    f"{source}, line {number}: the key is shorter than {MIN_KEY_LENGTH} characters "
                    "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            entries.append((name, key))
        if not entries:
            raise SettingsError(f"{source} lists no keys")
        try:
            return cls(entries)
        except SettingsError as exc:
            raise SettingsError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: Path) -> Keys:
        """Read a keys file; a missing or unreadable file is a :class:`SettingsError` (fail closed)."""
        source = f"OTELLAMA_API_KEYS_FILE={path}"
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{source}: cannot read it ({exc})") from None
        if mode & stat.S_IROTH:
            log.warning("%s is readable by every user on this machine; chmod 600 it", path)
        return cls.parse(text, source)


def _first_space(line: str) -> int:
    return next((i for i, c in enumerate(line) if c.isspace()), -1)


def _preflight(scope: Scope) -> bool:
    """Whether the request is a CORS preflight as browsers send it: OPTIONS, the method it announces, and
    no body (a preflight has none; an OPTIONS with one would carry it to Ollama without a key)."""
    if scope["method"] != "OPTIONS":
        return False
    announced = False
    for name, value in scope["headers"]:
        if name == b"access-control-request-method":
            announced = True
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return False
    return announced


def _bearer(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the one ``Authorization: Bearer`` header; None if missing, repeated or another scheme."""
    values = [value for key, value in headers if key == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


class Gate:
    """Checks each HTTP request's key before otellama does anything else with it (see module docstring)."""

    def __init__(
        self,
        keys: Keys,
        *,
        client_header: str = "x-client-name",
        forward_authorization: bool = False,
        protect_admin: bool = True,
    ) -> None:
        self.keys = keys
        self.client_header = client_header.lower().encode("latin-1")
        self.forward_authorization = forward_authorization
        self.protect_admin = protect_admin
        #: Requests refused so far (for tests and curious operators; the keys themselves are never kept).
        self.refused = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Gate | None:
        """The gate ``settings`` ask for, or None when no keys file is configured."""
        if settings.api_keys_file is None:
            return None
        keys = Keys.load(settings.api_keys_file)
        log.info("API keys required: %d keys for %d names", len(keys), len(keys.names))
        return cls(
            keys,
            client_header=settings.client_header,
            forward_authorization=settings.forward_authorization,
            protect_admin=settings.protect_admin,
        )

    def guards(self, path: str) -> bool:
        """Whether a request for ``path`` (the decoded path the router sees) needs a key."""
        if path.startswith(ADMIN_PREFIX):
            return self.protect_admin and path != OPEN_PATH
        return True

    async def admit(self, scope: Scope, send: Send) -> bool:
        """Let an HTTP request in (True), attributing it to its key's name, or answer 401 (False)."""
        path: str = scope["path"]
        if not self.guards(path):
            return True
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        token = _bearer(headers)
        name = self.keys.match(token) if token is not None else None
        forward_authorization = self.forward_authorization
        if token is None and _preflight(scope):
            # A browser's CORS preflight never carries credentials (Fetch standard): it goes to Ollama, which
            # answers it from its allowed origins; the request it announces then needs its key like any other.
            name, forward_authorization = ANONYMOUS, False
        if name is None:
            self.refused += 1
            client = scope.get("client")
            log.debug("refused %s %s from %s: %s API key", scope["method"], path, client and client[0],
                      "no" if token is None else "an unknown")  # fmt: skip
            await _refuse(path, send, missing=token is None)
            return False
        kept = [
            (key, value)
            for key, value in headers
            if key != self.client_header and (key != b"authorization" or forward_authorization)
        ]
        kept.append((self.client_header, name.encode("ascii")))
        scope["headers"] = kept
        return True


async def _refuse(path: str, send: Send, *, missing: bool) -> None:
    if missing:
        message = 'otellama: this server needs an API key: send the header "Authorization: Bearer <key>"'
    else:
        message = "otellama: invalid API key"
    body = error_body(path, message, kind="invalid_request_error", code="invalid_api_key")
    # The request body (maybe a large upload) is not read: end the connection instead.
    headers = json_headers(body, (b"www-authenticate", b"Bearer"), (b"connection", b"close"))
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["ANONYMOUS", "Gate", "Keys"]
