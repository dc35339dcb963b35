"""The exporter process, on real processes and sockets: ``otellama serve`` (the command itself), the emulator
and an OTLP receiver, with the collector failing, black-holed, or the exporter killed.

What every test checks is the promise of issue 12: the spans that arrive are exactly the spans of the JSONL
log, each once, with the ids and times the proxy chose; requests are answered whatever the collector does.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from otellama.emulator import EmulatorSettings, create_emulator
from otellama.exporter.follow import LogFollower, Position, mark_end
from otellama.server import BackgroundServer
from otellama.sinks.jsonlog import JsonLog
from tests.otlp_receiver import OtlpHttpReceiver
from tests.serving import MODEL, Serve, eventually, free_port, logged, traffic


def span_ids_of(lines: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """Every span the log's lines render to: (trace id, span id), as the proxy chose them."""
    ids = set()
    for line in lines:
        trace = line["trace"]
        spans = [trace["server_span_id"], trace["genai_span_id"], *trace["phase_span_ids"].values()]
        if trace.get("upstream_span"):
            spans.append(trace["upstream_span"]["span_id"])
        ids.update((line["trace_id"], span) for span in spans if span)
    return ids


def received(receiver: OtlpHttpReceiver) -> collections.Counter[tuple[str, str]]:
    return collections.Counter((s.trace_id, s.span_id) for s in receiver.spans())


def test_a_failing_collector_gets_every_span_once_when_it_is_back(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    with OtlpHttpReceiver() as receiver:
        receiver.fail_with, receiver.retry_after = 503, 0  # down: every export refused
        proc = otellama(emulator, log_file, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        started = time.monotonic()
        traffic(proc.url, 20)
        traffic(proc.url, 5, stream=True)
        assert time.monotonic() - started < 10  # requests answered while nothing could be exported
        eventually(lambda: receiver.attempts("traces") >= 2, "export attempts against the failing collector")
        assert receiver.spans() == []
        assert eventually(lambda: proc.metric("otellama_exporter_backlog_bytes") > 0, "a backlog")
        receiver.fail_with = None  # back
        lines = logged(log_file)
        expected = span_ids_of(lines)
        assert len(lines) == 25 and len(expected) >= 25 * 6  # server, GenAI, 4 phases, HTTP call
        eventually(lambda: set(received(receiver)) == expected, "every logged span at the collector")
        time.sleep(0.5)  # anything sent twice would arrive now
        assert max(received(receiver).values()) == 1  # each exactly once
        by_id = {(s.trace_id, s.span_id): s for s in receiver.spans()}
        for line in lines:  # the original times, not the time of export
            server = by_id[(line["trace_id"], line["trace"]["server_span_id"])]
            assert (server.start_ns, server.end_ns) == (line["trace"]["start_ns"], line["trace"]["end_ns"])
        assert {s.scope_name for s in receiver.spans()} == {"otellama", "opentelemetry.instrumentation.httpx"}
        eventually(lambda: proc.metric("otellama_exporter_backlog_bytes") == 0, "the backlog drained")
        assert proc.metric("otellama_export_failures_total") > 0
        assert proc.metric("otellama_exporter_skipped_total") == 0
        assert proc.metric("otellama_exporter_dropped_bytes_total") == 0


def test_the_exporter_killed_mid_run_is_restarted_counted_and_loses_nothing(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    with OtlpHttpReceiver() as receiver:
        proc = otellama(emulator, log_file, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        traffic(proc.url, 10)
        first = proc.exporter_pid()
        os.kill(first, signal.SIGKILL)
        traffic(proc.url, 10)  # written while no exporter runs
        eventually(lambda: proc.metric("otellama_exporter_restarts_total") == 1, "the restart, counted")
        assert proc.exporter_pid() != first
        expected = span_ids_of(logged(log_file))
        eventually(lambda: set(received(receiver)) == expected, "every logged span at the collector")
    assert "the exporter process exited (killed by SIGKILL)" in proc.stop()


def test_an_unwritable_log_directory_with_otlp_on_still_serves(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    # A file where the log's directory should be: the log sink drops and counts lines; the exporter has
    # nothing to follow. Neither may stop otellama from starting or answering.
    (tmp_path / "blocked").write_text("not a directory")
    with OtlpHttpReceiver() as receiver:
        proc = otellama(
            emulator, tmp_path / "blocked" / "otellama.jsonl", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint
        )
        traffic(proc.url, 3)
        assert proc.metric("otellama_log_failures_total") == 3


def test_a_line_that_is_no_record_is_skipped_and_counted_not_retried_forever(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    with OtlpHttpReceiver() as receiver:
        proc = otellama(emulator, log_file, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        traffic(proc.url, 2)
        with log_file.open("ab") as log:  # someone else's line in our log (or a bug of ours)
            log.write(b'{"not": "a record"}\nnot even json\n')
        traffic(proc.url, 2)
        expected = span_ids_of(logged(log_file))  # the four records, around the two lines
        eventually(lambda: set(received(receiver)) == expected, "the spans of the lines around them")
        eventually(lambda: proc.metric("otellama_exporter_skipped_total") == 2, "both lines counted")


def test_the_exporter_leaves_with_a_proxy_that_was_killed(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    # Else a restarted otellama would run two exporters on one log, and send everything twice.
    with OtlpHttpReceiver() as receiver:
        proc = otellama(emulator, tmp_path / "otellama.jsonl", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        exporter = proc.exporter_pid()
        proc.process.kill()
        proc.process.wait(10)
        eventually(
            lambda: not Path(f"/proc/{exporter}").exists() or _zombie(exporter), "the exporter to exit"
        )


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


def test_a_black_holed_collector_holds_up_neither_requests_nor_shutdown_and_loses_nothing(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    with socket.create_server(("127.0.0.1", 0), backlog=8) as black_hole:  # accepts, never answers
        endpoint = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
        proc = otellama(emulator, log_file, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTELLAMA_SHUTDOWN_GRACE="3")
        started = time.monotonic()
        traffic(proc.url, 10)
        assert time.monotonic() - started < 10
        proc.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert proc.process.wait(20) == -signal.SIGTERM
        assert time.monotonic() - signalled < 3 + 2  # the grace, and a little for the process to go
    # The next start, with a collector that answers, sends what the black hole never took.
    with OtlpHttpReceiver() as receiver:
        otellama(emulator, log_file, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        expected = span_ids_of(logged(log_file))
        assert len(expected) >= 10 * 6
        eventually(lambda: set(received(receiver)) == expected, "every logged span at the collector")
        assert max(received(receiver).values()) == 1


def test_sigterm_exports_the_records_of_requests_in_flight_before_exiting(
    tmp_path: Path, otellama: Callable[..., Serve]
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    paced = create_emulator(EmulatorSettings(token_rate=40, load_seconds=0.01, parallel=8))
    with BackgroundServer(paced) as upstream, OtlpHttpReceiver() as receiver:
        proc = otellama(upstream.url, log_file, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        body = {"model": MODEL, "prompt": "story", "options": {"num_predict": 40}}  # ~1 s each
        with httpx.Client(timeout=30) as client, contextlib.ExitStack() as streams:
            responses = [
                streams.enter_context(client.stream("POST", f"{proc.url}/api/generate", json=body))
                for _ in range(5)
            ]
            readers = [response.iter_lines() for response in responses]
            for reader in readers:
                next(reader)  # each has begun
            proc.process.send_signal(signal.SIGTERM)
            for reader in readers:
                assert orjson.loads(list(reader)[-1])["done"] is True
        assert proc.process.wait(30) == -signal.SIGTERM
        # Exited: by then the exporter had sent every span of the streams that were running.
        lines = logged(log_file)
        assert len(lines) == 5
        assert set(received(receiver)) == span_ids_of(lines)


@pytest.mark.parametrize("silenced", ["traces", "metrics"])
def test_otel_signal_exporter_none_exports_only_the_other_signal(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve], silenced: str
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    with OtlpHttpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, f"OTEL_{silenced.upper()}_EXPORTER": "none"}
        proc = otellama(emulator, log_file, **env)
        traffic(proc.url, 3)
        if silenced == "traces":
            eventually(lambda: receiver.metrics("ollama.requests"), "metrics")
        else:
            eventually(lambda: len(receiver.spans()) >= 18, "spans")
        time.sleep(1.0)  # what should not come has had time to
        proc.process.send_signal(signal.SIGTERM)
        proc.process.wait(20)
        assert receiver.attempts(silenced) == 0
        err = proc.stop()
    assert "Traceback" not in err and "ERROR" not in err


def test_otel_traces_exporter_console_prints_the_spans_without_an_endpoint(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    proc = otellama(emulator, log_file, OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="none")
    traffic(proc.url, 1)
    (line,) = eventually(lambda: logged(log_file), "the logged line")
    proc.process.send_signal(signal.SIGTERM)
    proc.process.wait(20)
    err = proc.stop()
    # The SDK's console exporter prints each span as JSON, its trace id as 0x-prefixed hex.
    assert f'"trace_id": "0x{line["trace_id"]}"' in err
    assert f'"span_id": "0x{line["trace"]["genai_span_id"]}"' in err


def test_disabled_httpx_instrumentation_sends_traceparent_and_no_http_span(
    tmp_path: Path, otellama: Callable[..., Serve]
) -> None:
    from tests.conftest import ScriptedUpstream

    log_file = tmp_path / "otellama.jsonl"
    upstream = ScriptedUpstream()
    with BackgroundServer(upstream) as server, OtlpHttpReceiver() as receiver:
        proc = otellama(
            server.url,
            log_file,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="flask, httpx",
        )
        body = orjson.dumps({"model": MODEL, "prompt": "hi", "stream": False})
        assert httpx.post(f"{proc.url}/api/generate", content=body).status_code == 200
        (line,) = eventually(lambda: logged(log_file), "the logged line")
        (seen,) = upstream.forwarded
        sent = (seen.header(b"traceparent") or b"").decode()
        assert sent == f"00-{line['trace_id']}-{line['trace']['genai_span_id']}-01"
        assert "upstream_span" not in line["trace"]
        # The echo's body is no Ollama answer: no phases, so the server and the GenAI span, and no other.
        spans = {(line["trace_id"], line["trace"][key]) for key in ("server_span_id", "genai_span_id")}
        eventually(lambda: set(received(receiver)) == spans, "the exchange's spans")
        assert {s.scope_name for s in receiver.spans()} == {"otellama"}


# --- the follower, on real rotated files ------------------------------------------------------------------
def test_the_follower_reads_across_rotations_in_order_and_counts_what_was_rotated_away(
    tmp_path: Path,
) -> None:
    path = tmp_path / "otellama.jsonl"
    writer = JsonLog(path, max_bytes=1000, backups=2)
    mark_end(path)
    follower = LogFollower(path, backups=2)
    numbers = iter(range(1_000_000))

    def write(count: int) -> None:
        for _ in range(count):
            assert writer.write(orjson.dumps({"n": next(numbers), "pad": "x" * 80}))

    def read_all() -> list[int]:
        lines, position = follower.read(10_000)
        follower.commit(position)
        return [orjson.loads(line)["n"] for line in lines]

    write(25)  # ~2.5 files: two rotations, nothing lost yet
    assert read_all() == list(range(25))
    write(25)
    first = read_all()
    assert first == list(range(25, 50))
    # A new follower (the exporter restarted) goes on from the saved position.
    write(5)
    follower.close()
    follower = LogFollower(path, backups=2)
    assert read_all() == list(range(50, 55))
    # Far behind: more rotations than backups while not reading. What it still holds open is read to its
    # end; the files rotated away in between are counted, and it goes on with the oldest file left.
    for _ in range(6):
        write(10)
        follower.refresh()  # the exporter lists the files every second, also while a collector is down
    got = read_all()
    assert got == sorted(got) and got[-1] == 114
    assert follower.dropped_files > 0 and follower.dropped_bytes > 0
    missing = set(range(55, 115)) - set(got)
    assert missing and follower.dropped_bytes >= len(missing) * 80
    assert Position(*orjson.loads(follower.state.read_bytes()).values()) == read_position(follower)
    # logrotate's copytruncate: the file is emptied under both; what is written next is read from its start.
    os.truncate(path, 0)
    write(3)
    assert read_all() == [115, 116, 117]
    writer.close()


def test_a_batch_ends_exactly_after_its_last_line_and_the_next_starts_there(tmp_path: Path) -> None:
    path = tmp_path / "otellama.jsonl"
    lines = [orjson.dumps({"n": n, "pad": "x" * (n % 13)}) for n in range(40)]
    # A blank line in the middle and a line still being written at the end (no newline yet).
    path.write_bytes(b"\n".join(lines[:20]) + b"\n\n" + b"\n".join(lines[20:]) + b"\n" + b'{"n": 4')
    follower = LogFollower(path, backups=0, start=Position(path.stat().st_ino, 0))
    got: list[bytes] = []
    while batch := follower.read(7)[0]:
        position = follower.read(0)[1]
        got += batch
        # The position after a batch is the byte after its last line: a follower started there goes on.
        assert LogFollower(path, backups=0, start=position).read(1)[0] == lines[len(got) : len(got) + 1]
    assert got == lines
    assert follower.read(0)[1].offset == path.stat().st_size - len(b'{"n": 4')


def read_position(follower: LogFollower) -> Position:
    return follower.read(1)[1]


def test_the_per_host_gauges_reach_the_collector_through_the_exporter(
    tmp_path: Path, otellama: Callable[..., Serve]
) -> None:
    # The gauges read the proxy's host pool; the metrics are exported by the exporter process, so the proxy
    # reports what each host holds to it. Two hosts, one of them down.
    dead = f"http://127.0.0.1:{free_port()}"
    emulated = EmulatorSettings(token_rate=0, load_seconds=0.01)
    with BackgroundServer(create_emulator(emulated)) as host, OtlpHttpReceiver() as receiver:
        proc = otellama(
            f"gpu1={host.url},gpu2={dead}",
            tmp_path / "otellama.jsonl",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTELLAMA_POLL_INTERVAL="0.2",
        )
        traffic(proc.url, 2)  # loads MODEL on gpu1

        def up() -> dict[object, object]:
            return {
                p.attributes.get("otellama.upstream"): p.value
                for p in receiver.metrics("otellama.upstream.up")
            }

        assert eventually(lambda: up() == {"gpu1": 1, "gpu2": 0} and up(), "both hosts' up gauges over OTLP")
        loaded = eventually(
            lambda: [p for p in receiver.metrics("ollama.model.loaded") if p.value == 1],
            "a loaded model's gauge over OTLP",
        )
        assert {
            (p.attributes["otellama.upstream"], p.attributes["gen_ai.request.model"]) for p in loaded
        } == {("gpu1", MODEL)}
        assert receiver.metrics("ollama.model.vram")  # the sizes come along
