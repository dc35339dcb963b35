"""The real Ollama recordings in tests/data/ollama-captures, with what each one was an answer to."""

from __future__ import annotations

import csv
import dataclasses
import re
from functools import cache

from tests.conftest import CAPTURES

_CONTENT_TYPES = {
    ".ndjson": b"application/x-ndjson",
    ".sse": b"text/event-stream",
    ".json": b"application/json; charset=utf-8",
}


@dataclasses.dataclass(frozen=True)
class Capture:
    name: str
    endpoint: str
    method: str
    request_body: bytes
    status: int
    content_type: bytes
    body: bytes

    @property
    def streamed(self) -> bool:
        return self.content_type != _CONTENT_TYPES[".json"]

    def chunks(self) -> list[bytes]:
        """The body as a server would write it: one NDJSON line or SSE event per write."""
        if not self.streamed:
            return [self.body]
        separator = b"\n\n" if self.content_type == _CONTENT_TYPES[".sse"] else b"\n"
        parts = self.body.split(separator)
        chunks = [part + separator for part in parts[:-1]]
        return [*chunks, parts[-1]] if parts[-1] else chunks


@cache
def load() -> tuple[Capture, ...]:
    with (CAPTURES / "SOURCES.tsv").open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    captures = []
    for row in rows:
        path = CAPTURES / row["file"]
        # The status is in the name for the error recordings (41-43, 48); every other one was a 200.
        match = re.search(r"error_(\d{3})", row["file"])
        captures.append(
            Capture(
                name=row["file"],
                endpoint=row["endpoint"],
                method=row["method"],
                request_body=row["request_body_if_known"].encode(),
                status=int(match.group(1)) if match else 200,
                content_type=_CONTENT_TYPES[path.suffix],
                body=path.read_bytes(),
            )
        )
    return tuple(captures)
