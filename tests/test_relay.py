"""``/otellama/metrics`` and ``/otellama/stats`` answered by the exporter process (otellama.exporter.relay).

The proxy process writes each exchange's JSONL line and nothing more; these tests hold the relayed answers to
what the proxy used to render itself, and check they stay current whatever the collector or the exporter do.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from otellama.exporter.relay import RelayServer, merge_expositions
from otellama.observe.record import Record
from otellama.sinks.otel.sink import OtelSink
from tests.serving import Serve, eventually, logged, traffic

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str | bytes) -> Samples:
    """Every sample but ``target_info`` (its service.instance.id is drawn per process) by name and labels."""
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name != "target_info"
    }


def in_process(lines: list[dict[str, object]]) -> Samples:
    """The metrics the proxy rendered itself before issue 12, from the same records."""
    sink = OtelSink(environ={})
    for line in lines:
        sink.write(Record.from_json(line))
    try:
        return samples(sink.prometheus())
    finally:
        sink.close()


def test_relayed_metrics_are_the_records_rendered_as_the_proxy_rendered_them(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    log_file = tmp_path / "otellama.jsonl"
    proc = otellama(emulator, log_file)
    traffic(proc.url, 6)
    traffic(proc.url, 4, stream=True)
    httpx.post(f"{proc.url}/api/generate", json={"model": "no-such-model", "prompt": "x"}, timeout=30)
    relayed = samples(httpx.get(f"{proc.url}/otellama/metrics").text)  # read-your-writes: no waiting
    expected = in_process(logged(log_file))
    per_exchange = {key: value for key, value in relayed.items() if key in expected}
    assert per_exchange == expected
    assert sum(v for (name, _), v in expected.items() if name == "ollama_requests_total") == 11
    # The in-flight gauge, which lives in the proxy, travels with the scrape: none open now.
    in_flight = {labels: v for (name, labels), v in relayed.items() if name == "ollama_requests_in_flight"}
    assert in_flight and set(in_flight.values()) == {0.0}


def test_relayed_stats_count_every_logged_exchange_at_once(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    proc = otellama(emulator, tmp_path / "otellama.jsonl")
    traffic(proc.url, 7)
    stats = httpx.get(f"{proc.url}/otellama/stats").json()
    assert stats["exchanges"] == 7
    assert httpx.get(f"{proc.url}/otellama/stats", params={"window": "soon"}).status_code == 400


def test_metrics_keep_counting_while_the_collector_is_black_holed(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=8) as black_hole:  # accepts, never answers
        endpoint = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
        proc = otellama(emulator, tmp_path / "otellama.jsonl", OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
        for count in (5, 10):
            traffic(proc.url, 5)  # the span export is stuck on the first batch all along
            assert proc.metric("ollama_requests_total") == count
            assert httpx.get(f"{proc.url}/otellama/stats").json()["exchanges"] == count


def test_counters_survive_an_exporter_restart_and_a_scrape_meanwhile_fails_rather_than_reads_zero(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    proc = otellama(emulator, tmp_path / "otellama.jsonl")
    traffic(proc.url, 4)
    assert proc.metric("ollama_requests_total") == 4
    os.kill(proc.exporter_pid(), signal.SIGKILL)
    traffic(proc.url, 3)
    statuses = set()

    def counted() -> bool:
        response = httpx.get(f"{proc.url}/otellama/metrics", timeout=15)
        statuses.add(response.status_code)
        if response.status_code != 200:
            return False
        found = samples(response.text)
        # The new exporter reads the log again from where it was when the proxy started: no reset, no gap.
        assert sum(v for (name, _), v in found.items() if name == "ollama_requests_total") == 7
        assert sum(v for (name, _), v in found.items() if name == "otellama_exporter_restarts_total") == 1
        return True

    eventually(counted, "an answer from the restarted exporter")
    assert statuses <= {200, 503}


def test_with_the_log_off_export_follows_a_private_spool_removed_at_exit(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    from tests.otlp_receiver import OtlpHttpReceiver

    spools = tmp_path / "tmp"
    spools.mkdir()
    with OtlpHttpReceiver() as receiver:
        proc = otellama(
            emulator,
            tmp_path / "unused.jsonl",
            OTELLAMA_LOG_FILE="off",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            TMPDIR=str(spools),
        )
        traffic(proc.url, 3)
        assert proc.metric("ollama_requests_total") == 3
        (spool,) = spools.glob("otellama-spool-*")
        assert (spool / "spool.jsonl").stat().st_size > 0
        eventually(lambda: len({s.trace_id for s in receiver.spans()}) == 3, "the three traces")
        proc.process.send_signal(signal.SIGTERM)
        assert proc.process.wait(20) == -signal.SIGTERM or proc.process.returncode == 0
    assert not (tmp_path / "unused.jsonl").exists()
    assert not spool.exists()


def test_an_app_built_with_the_log_off_but_never_started_leaves_no_spool(tmp_path: Path) -> None:
    import subprocess
    import sys

    build = "from otellama.app import create_app; from otellama.settings import Settings; "
    build += (
        "create_app(Settings(log_file=None)); import glob, os; print(glob.glob(os.environ['TMPDIR'] + '/*'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTELLAMA_"))}
    done = subprocess.run(
        [sys.executable, "-c", build], env={**env, "TMPDIR": str(tmp_path)}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "otellama-spool-" in done.stdout  # it was made...
    assert list(tmp_path.iterdir()) == []  # ...and the process left nothing behind


def test_a_disabled_sdk_counts_nothing_and_exports_nothing_through_the_exporter_process(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    from tests.otlp_receiver import OtlpHttpReceiver

    log_file = tmp_path / "otellama.jsonl"
    with OtlpHttpReceiver() as receiver:
        proc = otellama(
            emulator, log_file, OTEL_SDK_DISABLED="true", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint
        )
        traffic(proc.url, 2)
        # README: "the OpenTelemetry SDK is off: no OTLP export, and /otellama/metrics answers with no
        # metrics; the JSONL log stays on". An empty exposition is an answer, not a 503.
        scrape = httpx.get(f"{proc.url}/otellama/metrics")
        assert scrape.status_code == 200 and b"ollama_requests_total" not in scrape.content
        assert len(logged(log_file)) == 2
        proc.process.send_signal(signal.SIGTERM)  # the exporter drains to the log's end before it exits
        assert proc.process.wait(20) in (0, -signal.SIGTERM)
        assert receiver.attempts() == 0


def test_merged_expositions_have_each_family_once() -> None:
    exporter = (
        b"# HELP a_total A\n# TYPE a_total counter\na_total 1.0\n# HELP target_info T\ntarget_info 1.0\n"
    )
    proxy = (
        b"# HELP target_info T\n# TYPE target_info gauge\ntarget_info 1.0\n# HELP b_total B\nb_total 2.0\n"
    )
    merged = merge_expositions(exporter, proxy)
    assert merged.count(b"# HELP target_info") == 1
    assert samples(merged) == {("a_total", ()): 1.0, ("b_total", ()): 2.0}


@pytest.mark.parametrize("request_line", [b"not json\n", b"[1, 2]\n", b'{"what": 1}\n', b"\n"])
def test_the_relay_answers_nothing_to_a_bad_request_and_keeps_serving(
    tmp_path: Path, request_line: bytes
) -> None:
    def answer(request: Mapping[str, Any]) -> bytes:
        if "stats" not in request:
            raise ValueError("unknown request")  # as the exporter's answer does
        return orjson.dumps(request)

    server = RelayServer(str(tmp_path / "relay.sock"), answer)
    server.start()
    try:
        for line, answer in ((request_line, b""), (b'{"stats": 60}\n', b'={"stats":60}')):
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(tmp_path / "relay.sock"))
                client.sendall(line)
                assert client.makefile("rb").read() == answer
    finally:
        server.close()
    assert not (tmp_path / "relay.sock").exists()


def test_a_line_that_is_no_record_is_counted_without_otlp_too(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    # No span export reads the lines then: the live view counts what it cannot read back.
    log_file = tmp_path / "otellama.jsonl"
    proc = otellama(emulator, log_file)
    traffic(proc.url, 1)
    with log_file.open("ab") as log:  # someone else's lines in our log
        log.write(b'{"not": "a record"}\nnot even json\n')
    traffic(proc.url, 1)
    assert proc.metric("ollama_requests_total") == 2
    eventually(lambda: proc.metric("otellama_exporter_skipped_total") == 2, "both lines counted")


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="the kernel has no autogroups")
def test_the_exporter_is_niced_with_its_scheduling_group(
    tmp_path: Path, emulator: str, otellama: Callable[..., Serve]
) -> None:
    from otellama.exporter.process import EXPORTER_NICENESS

    proc = otellama(emulator, tmp_path / "otellama.jsonl")
    exporter = proc.exporter_pid()
    # Its own session is its own autogroup: a nice value of the process alone would not count against the
    # proxy's group (BENCHMARKS.md, the soak).
    group = eventually(
        lambda: (
            (text := Path(f"/proc/{exporter}/autogroup").read_text()).endswith(f"nice {EXPORTER_NICENESS}\n")
            and text
        ),
        "the exporter's autogroup niced",
    )
    # The kernel shows nothing for the root group, where a proxy started from a session-less container sits.
    proxy_group = Path(f"/proc/{proc.process.pid}/autogroup").read_text().split() or ["the root group"]
    assert group.split()[0] != proxy_group[0]
    assert int(Path(f"/proc/{exporter}/stat").read_text().rsplit(")", 1)[1].split()[16]) == EXPORTER_NICENESS
