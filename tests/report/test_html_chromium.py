"""report.html in headless Chromium: it renders, has its tables, images and claims, and logs no error.

Needs Debian's `chromium` at /usr/bin/chromium (`.ci/run` installs it: apt-get install -y chromium);
skipped with that reason elsewhere. The test installs nothing.

Two runs of the browser: `--dump-dom` (the DOM after parsing: tables, img data: URIs, claims) and
`--screenshot` (pixels: the embedded figures were decoded and painted). Both log the console to stderr
(`--enable-logging=stderr --v=0`): the page has no script, so any console message, e.g. a
Content-Security-Policy violation from a resource that is not embedded, is a failure.
"""

from __future__ import annotations

import base64
import io
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                "(apt-get install -y chromium); .ci/run installs it")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]
SLERP_ORANGE, DPO_CYAN, MERGEALIGN_RED = (255, 127, 14), (23, 190, 207), (214, 39, 40)   # figures.py colors


def chromium(html: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *extra, html.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


class Dom(HTMLParser):
    """Collects what the checks need from the dumped DOM."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.imgs: list[str] = []
        self.captions: list[str] = []
        self.badges: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "caption" or (tag == "span" and "badge" in (a.get("class") or "")):
            self._in = tag

    def handle_data(self, data):
        if self._in == "caption":
            self.captions.append(data)
        elif self._in == "span":
            self.badges.append(data)
        self._in = None


@pytest.fixture(scope="module")
def dom(full_report, tmp_path_factory):
    run = chromium(full_report["html"], tmp_path_factory.mktemp("profile"), "--dump-dom")
    assert run.returncode == 0, run.stderr[-3000:]
    parsed = Dom()
    parsed.feed(run.stdout)
    return parsed, run


def test_renders_its_tables_and_claims(dom):
    parsed, run = dom
    assert parsed.tags.get("table", 0) == 5              # four score tables and the timings
    assert [c.split(":")[0] for c in parsed.captions] == ["Table 1", "Table 2", "Table 3", "Table 4"]
    assert parsed.tags.get("tr", 0) > 40
    verdicts = [b for b in parsed.badges if b in ("PASS", "FAIL", "SKIPPED")]
    assert verdicts == ["PASS"] * 6


def test_images_are_embedded_pngs_that_decode(dom):
    parsed, _ = dom
    assert len(parsed.imgs) == 2
    for src in parsed.imgs:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        img.verify()
        assert img.size[0] > 500


def test_logs_no_console_message(dom):
    _, run = dom
    assert console_lines(run.stderr) == []


def test_screenshot_shows_the_figures(full_report, tmp_path):
    shot = tmp_path / "shot.png"
    run = chromium(full_report["html"], tmp_path / "profile", "--window-size=1280,1400", f"--screenshot={shot}")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-3000:]
    assert console_lines(run.stderr) == []
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 1400)
    colors = {rgb for _, rgb in img.getcolors(maxcolors=1 << 20)}
    counts = {rgb: n for n, rgb in img.getcolors(maxcolors=1 << 20)}
    assert len(colors) > 200                              # not a blank or error page
    for rgb in (SLERP_ORANGE, DPO_CYAN, MERGEALIGN_RED):  # the scatter's markers were painted
        assert counts.get(rgb, 0) > 20, rgb
