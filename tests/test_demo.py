"""``otellama demo``: the whole scripted workload through the official client, in process, exporting to a real
OTLP receiver; its output must show the report table, the log (which must hold every exchange), the HTML
page and one exchange's waterfall. Timings are shortened (a 0.3 s cold load, fast tokens) to keep it quick;
``make demo`` runs it at realistic speed."""

from __future__ import annotations

import io
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from otellama import demo
from otellama.cli import main
from tests.otlp_receiver import OtlpHttpReceiver

EXCHANGES = 12 + demo.CONCURRENT + demo.STEADY  # the script's steps, concurrent requests counted one by one


@pytest.fixture
def receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as started:
        yield started


def test_demo_shows_table_log_page_and_waterfall(
    tmp_path: Path, receiver: OtlpHttpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    out = io.StringIO()
    log = tmp_path / "demo" / "otellama.jsonl"
    code = demo.run(otlp=receiver.endpoint, log_file=log, load_seconds=0.3, token_rate=600, out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in os.environ  # the demo put the environment back

    # The log: one line per exchange, each outcome the script provoked.
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert len(lines) == EXCHANGES
    outcomes = Counter((line["outcome"], line["error_type"]) for line in lines)
    assert outcomes[("cancelled", "cancelled")] == 1
    assert outcomes[("error", "stream_error")] == 1
    assert outcomes[("error", "404")] == 1
    assert sum(line["cold_start"] is True for line in lines) == 3  # two chat models and the embedding model
    assert any((line["queue_time_ms"] or 0) > 10 for line in lines)  # the concurrent burst had to queue
    assert {line["operation"] for line in lines} == {"chat", "text_completion", "embeddings", None}
    assert {line["stream"] for line in lines if line["operation"] in ("chat", "text_completion")} == {
        True,
        False,
    }

    # The output: the table, the log's path, the page, the waterfall, how to use it for real.
    assert f"{EXCHANGES} exchanges from" in text
    for model in ("llama3.2:3b", "gemma3:1b", "nomic-embed-text", "no-such-model"):
        assert f"\n{model}\n" in text
    assert "time to first token" in text and "cold starts" in text
    assert f"The JSONL log: {log} ({EXCHANGES} lines" in text
    page = log.with_name("report.html")
    assert f"The HTML report: {page}" in text and page.stat().st_size > 5000
    waterfall = text[text.index("One exchange to scale") :]
    rows = {row.split()[0]: row for row in waterfall.splitlines()[1:6]}
    assert (
        {"exchange", "queue", "load", "prompt", "generation"}
        >= rows.keys()
        >= {"exchange", "load", "generation"}
    )
    load = re.search(r"^  load +(█+)", waterfall, re.M)
    assert load and len(load.group(1)) > 30, waterfall  # the cold load fills most of the axis
    assert "otellama serve --upstream" in text and "OLLAMA_HOST=127.0.0.1:11435" in text

    # --otlp: the same exchanges reached the collector.
    names = {span.name for span in receiver.wait_for_spans("ollama.load", count=3)}
    assert names == {"ollama.load"}
    spans = receiver.spans()
    assert {line["trace_id"] for line in lines} <= {span.trace_id for span in spans}


def test_demo_help_and_make_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--otlp" in help_text and "examples:" in help_text
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t\$\(BIN\)/otellama demo$", makefile, re.M)
