"""``otellama report --html``: a self-contained page whose charts really draw, checked in headless Chromium.

Chromium comes from Debian's ``chromium`` package, installed by ``scripts/install-chromium`` (``make test``
runs it). Without it this test fails, saying so: a missing browser must not pass for a drawn chart.

The page itself carries no script (its Content-Security-Policy forbids any). To measure what the browser
laid out, the test renders a copy with a measuring script appended, dumps the DOM after load and reads the
sizes back; then it takes a screenshot of the real page and checks the charts' colours were painted.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from otellama.cli import main
from otellama.tools import charts
from tests import synthetic

MEASURE = """
<script>
window.addEventListener("load", () => {
  const charts = [...document.querySelectorAll("svg.chart")].map((svg) => {
    const box = svg.getBoundingClientRect();
    const bars = [...svg.querySelectorAll("rect.bar")].filter((r) => {
      const b = r.getBBox();
      return b.width > 0 && b.height > 0;
    });
    return {kind: svg.dataset.chart, width: box.width, height: box.height, bars: bars.length,
            label: svg.getAttribute("aria-label")};
  });
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify(charts);
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Chromium is not installed: run scripts/install-chromium (make test does), "
                    "or 'apt-get install chromium'")  # fmt: skip
    return found


def browse(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    profile.mkdir()
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) into rows of bytes."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, data, header = 8, b"", b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        body = png[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            data += body
        position += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(data)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up = previous[x]
            corner = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(bytes(line if channels == 3 else b"".join(line[i : i + 3] for i in range(0, stride, 4))))
        previous = line
    return width, height, rows


@pytest.fixture
def page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    log = synthetic.write(tmp_path / "otellama.jsonl", synthetic.records(600, seed=21, step_ns=7 * 10**9))
    target = tmp_path / "report.html"
    assert main(["report", "--html", str(target), str(log)]) == 0
    capsys.readouterr()
    return target


def test_page_is_self_contained(page: Path) -> None:
    text = page.read_text()
    assert "default-src 'none'" in text  # the browser may fetch nothing for it
    assert "<script" not in text and "src=" not in text and "@import" not in text and "url(" not in text
    assert re.findall(r"https?://[^\"' ]+", text) == ["http://www.w3.org/2000/svg"] * text.count("<svg ")


def test_names_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = "<img src=x onerror=alert(1)>"
    items = synthetic.records(30, seed=2)
    log = synthetic.write(tmp_path / "otellama.jsonl",
                          [type(r)(**{**{f: getattr(r, f) for f in r.__dataclass_fields__}, "model": evil})
                           for r in items])  # fmt: skip
    target = tmp_path / "report.html"
    assert main(["report", "--html", str(target), str(log)]) == 0
    text = target.read_text()
    assert evil not in text and "&lt;img src=x onerror=alert(1)&gt;" in text


def test_charts_draw_in_chromium(page: Path, tmp_path: Path) -> None:
    measured_page = tmp_path / "measured.html"
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text())
    measured_page.write_text(text.replace("</body>", MEASURE + "</body>"))
    dom = browse(tmp_path, "--window-size=1280,2400", "--virtual-time-budget=2000", "--dump-dom",
                 measured_page.as_uri()).stdout  # fmt: skip
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, "the measuring script never ran: the page did not load"
    drawn: list[dict[str, Any]] = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    kinds = [chart["kind"] for chart in drawn]
    models = ("llama3.2:3b", "qwen3:14b", "gemma3:1b")
    assert kinds.count("timeline") == 1 and kinds.count("phases") == 1
    assert kinds.count("ttft") == len(models) and kinds.count("tokens_per_second") == len(models)
    for model in models:
        assert any(c["label"] == f"time to first token, {model}" for c in drawn)
        assert any(c["label"] == f"generation tokens per second, {model}" for c in drawn)
    for chart in drawn:
        assert chart["width"] > 200 and chart["height"] > 100, chart
        assert chart["bars"] >= 3, f"{chart['label']}: only {chart['bars']} bars drawn"


def test_screenshot_shows_the_charts_colours(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    browse(tmp_path, "--window-size=1280,2400", "--force-device-scale-factor=0.5", "--hide-scrollbars",
           f"--screenshot={shot}", page.as_uri())  # fmt: skip
    width, height, rows = pixels(shot.read_bytes())  # at half scale: a quarter of the pixels to decode
    assert (width, height) == (640, 1200)
    wanted = {
        name: bytes.fromhex(colour[1:])
        for name, colour in {**charts.PHASE_COLOURS, **charts.OUTCOME_COLOURS}.items()
        if name != "ok"  # same blue as prompt eval
    }
    counts = dict.fromkeys(wanted, 0)
    for row in rows:
        for x in range(0, len(row), 3):
            pixel = row[x : x + 3]
            for name, colour in wanted.items():
                if pixel == colour:
                    counts[name] += 1
    missing = [name for name, n in counts.items() if n < 20]
    assert not missing, f"colours never painted: {missing} (counts {counts})"
