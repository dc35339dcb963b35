"""Which Ollama host gets a request, when there are several, and the answers otellama merges from all.

A request that names a model (generate, chat, embeddings, show, and their ``/v1`` forms) goes, in order of
preference, to:

1. the hosts that are up and have the model (``/api/tags``);
2. of those, the ones where it is loaded now (``/api/ps``, and learned from each answer);
3. of those, the one with the fewest requests in flight through otellama, ties taking turns.

When no host has the model it goes to the host with the fewest in flight, and Ollama answers (it loads a
model it has soonest there, or says it has none). The other candidates follow in the plan, for failing over.
Management calls (pull, push, create, copy, delete, blobs) go to the host the ``X-Otellama-Upstream``
header names, else the first host, and nowhere else: a pull meant for one host never lands on another.
``GET /api/tags``, ``/v1/models`` and ``/api/ps`` are answered from every host (:func:`merge`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any, Final

import orjson

from otellama.exchange import Route
from otellama.proxy.hosts import NAME_LIMIT, Host, HostPool, model_key

#: Names the host of a management call; never forwarded.
UPSTREAM_HEADER: Final = b"x-otellama-upstream"
#: Where the request body names the model to route by.
MODEL_PATHS: Final = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/api/show",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
)
_MANAGEMENT: Final = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
#: (method, path) answered as the union of every host's answer.
MERGED: Final = frozenset({("GET", "/api/tags"), ("GET", "/v1/models"), ("GET", "/api/ps")})
#: The field each merged ``/api/ps`` entry gets, naming its host.
PS_HOST_FIELD: Final = "otellama_upstream"
_V1_MODEL: Final = "/v1/models/"


def is_management(path: str) -> bool:
    return path in _MANAGEMENT or path.startswith("/api/blobs/")


def model_of(path: str, body: bytes | None) -> str | None:
    """The model a request names: in its JSON body's ``model``, or ``/v1/models/{model}``'s path."""
    if path.startswith(_V1_MODEL):
        name = path[len(_V1_MODEL) :]
        return name if 0 < len(name) <= NAME_LIMIT else None
    if path not in MODEL_PATHS or not body:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    if not isinstance(model, str):
        model = parsed.get("name") if isinstance(parsed, dict) else None  # /api/show's older field
    return model if isinstance(model, str) and 0 < len(model) <= NAME_LIMIT else None


@dataclasses.dataclass(slots=True)
class Plan:
    """The hosts to try, in order, and why the first was chosen. ``model`` is the routing key, if any."""

    hosts: list[Host]
    reason: Route
    model: str | None


class Router:
    """Plans each request's hosts from what the :class:`~otellama.proxy.hosts.HostPool` knows."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self._turn = 0

    def for_model(self, model: str | None) -> Plan:
        """The plan for a request naming ``model`` (or none: then any host, least busy first)."""
        hosts = self.pool.hosts
        up = [host for host in hosts if host.up is not False]
        key = model_key(model) if model else None
        if key is None:
            return Plan(self._least_busy(up or hosts), "least_busy", None)
        having = [host for host in up if host.has(key)]
        if not having:
            # Down hosts known to have it may be back; hosts without it would only say "not found".
            having = [host for host in hosts if host.models is not None and key in host.models]
            if not having:
                return Plan(self._least_busy(up or hosts), "least_busy", key)
        if len(having) == 1:
            return Plan(having, "only", key)
        warm = [host for host in having if host.warm(key)]
        if warm:
            ordered = self._least_busy(warm)
            return Plan(ordered + self._least_busy([h for h in having if h not in warm]), "warm", key)
        return Plan(self._least_busy(having), "least_busy", key)

    def for_management(self, named: Host | None) -> Plan:
        return Plan([named or self.pool.hosts[0]], "only", None)

    def _least_busy(self, hosts: Sequence[Host]) -> list[Host]:
        """``hosts`` by requests in flight, fewest first; hosts tied for fewest take turns at the front."""
        ordered = sorted(hosts, key=lambda host: host.in_flight)
        if not ordered:
            return []
        ties = sum(1 for host in ordered if host.in_flight == ordered[0].in_flight)
        if ties > 1:
            turn = self._turn % ties
            self._turn += 1
            ordered = ordered[turn:ties] + ordered[:turn] + ordered[ties:]
        return ordered


def merge(path: str, answers: Sequence[tuple[Host, Any]]) -> bytes:
    """One answer from every host's answer to ``GET path`` (:data:`MERGED`), in that API's own shape.

    ``/api/tags`` and ``/v1/models`` list each model once (the first host's entry), newest first;
    ``/api/ps`` lists every loaded model on every host, each naming its host in :data:`PS_HOST_FIELD`.
    """
    if path == "/v1/models":
        seen: dict[str, dict[str, Any]] = {}
        for _, answer in answers:
            for entry in _entries(answer, "data", "id"):
                seen.setdefault(entry["id"], entry)
        data = sorted(seen.values(), key=lambda entry: _number(entry.get("created")), reverse=True)
        return orjson.dumps({"object": "list", "data": data})
    if path == "/api/ps":
        running = [
            {**entry, PS_HOST_FIELD: host.name} for host, answer in answers for entry in _entries(answer)
        ]
        return orjson.dumps({"models": running})
    models: dict[str, dict[str, Any]] = {}
    for _, answer in answers:
        for entry in _entries(answer):
            models.setdefault(model_key(entry["name"]), entry)
    listing = sorted(models.values(), key=lambda entry: _when(entry.get("modified_at")), reverse=True)
    return orjson.dumps({"models": listing})


def _entries(answer: Any, field: str = "models", name: str = "name") -> list[dict[str, Any]]:
    items = answer.get(field) if isinstance(answer, dict) else None
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, dict) and isinstance(item.get(name), str)]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _when(value: Any) -> float:
    try:
        return dt.datetime.fromisoformat(value).timestamp() if isinstance(value, str) else 0.0
    except ValueError:
        return 0.0
