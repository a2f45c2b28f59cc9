"""The cohort report page: escaping, row order, thumbnails, columns, empty cohorts, and the
page itself in a headless Chromium (images decode, sorting works, no console errors)."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsd_wsi.report import ReportRow, render_report, report_order, write_report

SETTINGS = {"stages": ["tile", "segment"], "model": "/models/unet.safetensors", "version": "0.1.0",
            "scheduler": {"kind": "local", "workers": 2}}
ODD_ID = 'slide-3 <b>&"q"'  # a slide id with HTML characters
LONG_ERROR = "\n".join(
    ["Traceback (most recent call last):"]
    + [f'  File "/opt/gsd_wsi/stages/segment.py", line {100 + i}, in <module> & run_{i}' for i in range(30)]
    + ['KilledWorker: ("segment-<slide>", <WorkerState "tcp://10.0.0.7:4012", memory: 0>)']
)


class _Page(HTMLParser):
    """The parts of the report the tests look at: slide rows (status, cell texts), header
    labels, and every <img> src with the row it sits in."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.headers: list[str] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self._in_th = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and "slide" in (a.get("class") or "").split():
            self.rows.append({"status": a["data-status"], "cells": [], "imgs": 0})
        elif tag == "td" and self.rows and self._cell is None:
            self._cell = []
        elif tag == "th" and a.get("scope") == "col":
            self._in_th, self._cell = True, []
        elif tag == "img":
            self.imgs.append(a["src"] or "")
            if self.rows and self._cell is not None:
                self.rows[-1]["imgs"] += 1
        elif tag == "a" and self._cell is not None:
            self.links.append(a["href"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self.rows:
            self.rows[-1]["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "th" and self._in_th:
            self.headers.append("".join(self._cell or []).strip())
            self._in_th, self._cell = False, None
        elif tag == "tr":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _picture(path: Path, width_px: int, height_px: int, seed: int, tissue: bool = True) -> Path:
    """A made-up overlay: pinkish tissue blobs on white, with green and blue mask regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height_px, 0:width_px].astype(np.float32)
    rgb = np.full((height_px, width_px, 3), 245, np.uint8)
    if tissue:
        cy, cx = height_px * rng.uniform(0.4, 0.6), width_px * rng.uniform(0.4, 0.6)
        blob = ((yy - cy) / (0.35 * height_px)) ** 2 + ((xx - cx) / (0.35 * width_px)) ** 2 < 1
        rgb[blob] = (222, 160, 200)
        rgb[blob & (np.sin(xx / 23.0) * np.cos(yy / 17.0) > 0.45)] = (40, 190, 70)  # "gland"
        rgb[blob & (np.sin(xx / 11.0 + 1) > 0.93)] = (40, 90, 230)  # "nucleus"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def _rows(out: Path) -> list[ReportRow]:
    both = {"tile": "done", "segment": "done"}
    return [
        ReportRow("slide-10", "/data/slides/slide-10.svs", "done", both,
                  seconds={"tile": 14.2, "segment": 61.0}, tissue_mm2=88.4, class_mm2={"gland": 12.5, "stroma": 40.1},
                  n_windows=212, n_patches=1480, thumbnail=_picture(out / "slide-10" / "overlay.png", 900, 640, 1),
                  host="node-a", attempts=1),
        ReportRow("slide-2", "/data/slides/slide-2.svs", "done", both,
                  seconds={"tile": 9.8, "segment": 40.3}, tissue_mm2=51.0, class_mm2={"gland": 7.25},
                  n_windows=130, n_patches=910, thumbnail=_picture(out / "slide-2" / "overlay.png", 640, 820, 2),
                  host="node-b", attempts=1),
        ReportRow(ODD_ID, "/data/slides/slide-3 <b>.svs", "failed", {"tile": "done", "segment": "failed"},
                  error=LONG_ERROR, error_kind="KilledWorker", seconds={"tile": 11.0, "segment": 300.0},
                  tissue_mm2=63.2, n_patches=1002, thumbnail=_picture(out / "slide-3" / "tissue.png", 800, 600, 3),
                  host="node-a", attempts=3),
        ReportRow("slide-4", "/data/slides/slide-4.svs", "failed", {"tile": "failed"},
                  error="SlideOpenError: /data/slides/slide-4.svs: not a TIFF or SVS file (<magic 0x00>); "
                        "check the file is complete & readable\n" + "detail " * 120,
                  error_kind="SlideOpenError", seconds={"tile": 0.4}, host="node-b", attempts=2),
        ReportRow("slide-5", "/data/slides/slide-5.svs", "no_tissue", {"tile": "no_tissue"},
                  seconds={"tile": 3.1}, tissue_mm2=0.0, n_patches=0,
                  thumbnail=_picture(out / "slide-5" / "tissue.png", 600, 600, 5, tissue=False), host="node-a",
                  attempts=1),
    ]


def _row(slide_id: str, status: str = "done", **kwargs) -> ReportRow:
    return ReportRow(slide_id, f"/s/{slide_id}.svs", status, {"tile": status}, **kwargs)


# -- unit tests ---------------------------------------------------------------------------


def test_everything_from_rows_and_settings_is_escaped(tmp_path: Path) -> None:
    rows = [_row("<script>alert('id')</script>", "failed", error='boom <img src=x onerror="alert(1)"> & "q"',
                 error_kind="<Kind>", host="<h>", class_mm2={"<b>cls</b>": 1.0})]
    page = render_report(rows, title="<Cohort & co>", settings={"<k>": "<v>", "nested": {"a": "<x>"}},
                         report_dir=tmp_path)
    for raw in ("<script>alert", "<img src=x", "<Kind>", "<h>", "<b>cls", "<Cohort", "<k>", "<v>", "<x>"):
        assert raw not in page
    assert "&lt;script&gt;alert(&#x27;id&#x27;)&lt;/script&gt;" in page
    assert 'boom &lt;img src=x onerror=&quot;alert(1)&quot;&gt; &amp; &quot;q&quot;' in page
    parsed = _parse(page)
    assert parsed.rows[0]["cells"][1].startswith("<script>alert('id')</script>")  # shown as text
    assert "<b>cls</b> mm²" in parsed.headers
    assert page.count("<script>") == 1  # only the page's own


def test_failures_first_then_no_tissue_then_the_rest_by_slide_id(tmp_path: Path) -> None:
    rows = [_row("b-10"), _row("b-2", "skipped"), _row("z", "failed"), _row("a", "no_tissue"),
            _row("a", "failed"), _row("b-1", "done")]
    expected = [("a", "failed"), ("z", "failed"), ("a", "no_tissue"), ("b-1", "done"), ("b-2", "skipped"),
                ("b-10", "done")]
    assert [(r.slide_id, r.status) for r in report_order(rows)] == expected
    parsed = _parse(render_report(rows, title="t", settings={}, report_dir=tmp_path))
    assert [(row["cells"][1].split("/s/")[0], row["status"]) for row in parsed.rows] == expected


def test_missing_thumbnail_gets_a_placeholder_not_an_img(tmp_path: Path) -> None:
    picture = _picture(tmp_path / "s1" / "overlay.png", 1000, 500, 0)
    rows = [_row("s1", thumbnail=picture), _row("s2"), _row("s3", thumbnail=tmp_path / "gone.png")]
    parsed = _parse(render_report(rows, title="t", settings={}, report_dir=tmp_path))
    by_id = {row["cells"][1].split("/s/")[0]: row for row in parsed.rows}
    assert by_id["s1"]["imgs"] == 1 and by_id["s2"]["imgs"] == 0 and by_id["s3"]["imgs"] == 0
    assert by_id["s2"]["cells"][0] == "no image"
    assert by_id["s3"]["cells"][0] == "image missing"
    assert parsed.links == ["s1/overlay.png"]  # relative to the report's folder


def test_thumbnail_is_a_small_jpeg(tmp_path: Path) -> None:
    picture = _picture(tmp_path / "a b" / "overlay.png", 2000, 1200, 0)
    page = render_report([_row("s", thumbnail=picture)], title="t", settings={}, report_dir=tmp_path / "report")
    parsed = _parse(page)
    src = next(s for s in parsed.imgs if s.startswith("data:image/jpeg;base64,"))
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (320, 192)
    assert parsed.links == ["../a%20b/overlay.png"]


def test_one_column_per_class_in_any_row(tmp_path: Path) -> None:
    rows = [_row("s1", class_mm2={"gland": 1.5}), _row("s2", class_mm2={"stroma": 2.0, "gland": 0.25}), _row("s3")]
    parsed = _parse(render_report(rows, title="t", settings={}, report_dir=tmp_path))
    assert [h for h in parsed.headers if h.endswith(" mm²")] == ["Tissue mm²", "gland mm²", "stroma mm²"]
    gland, stroma = parsed.headers.index("gland mm²"), parsed.headers.index("stroma mm²")
    cells = {row["cells"][1].split("/s/")[0]: row["cells"] for row in parsed.rows}
    assert (cells["s1"][gland], cells["s1"][stroma]) == ("1.50", "–")
    assert (cells["s2"][gland], cells["s2"][stroma]) == ("0.25", "2.00")
    assert (cells["s3"][gland], cells["s3"][stroma]) == ("–", "–")
    assert all(len(row["cells"]) == len(parsed.headers) for row in parsed.rows)


def test_zero_rows(tmp_path: Path) -> None:
    path = write_report(tmp_path / "report.html", [], title="empty", settings={}, wall_s=0.0)
    page = path.read_text(encoding="utf-8")
    parsed = _parse(page)
    assert parsed.rows == [] and parsed.imgs == []
    assert "No slides in this run." in page and "No failures." in page and "No class areas recorded." in page


def test_one_row_without_areas_or_timings(tmp_path: Path) -> None:
    page = render_report([_row("only", "failed", error="x")], title="t", settings={}, report_dir=tmp_path)
    parsed = _parse(page)
    assert len(parsed.rows) == 1
    assert "No class areas recorded." in page and "No timings recorded." in page
    assert sum(s.startswith("data:image/svg+xml;base64,") for s in parsed.imgs) == 1  # the failure chart


def test_header_counts_and_slides_per_hour(tmp_path: Path) -> None:
    rows = [_row("a"), _row("b", "failed"), _row("c", "no_tissue"), _row("d", "skipped")]
    page = render_report(rows, title="t", settings={}, wall_s=1800.0, report_dir=tmp_path)
    cards = {k: v for v, k in re.findall(r'<span class="v">([^<]*)</span><span class="k">([^<]*)</span>', page)}
    assert cards == {"slides": "4", "done": "1", "skipped": "1", "failed": "1", "no tissue": "1",
                     "wall time": "30 min 00 s", "slides / hour": "6.0"}  # skipped slides are not counted


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.html"
    assert write_report(path, [_row("a")], title="first", settings={}) == path
    write_report(path, [_row("b")], title="second", settings={})
    assert "second" in path.read_text(encoding="utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_bad_status_is_refused() -> None:
    with pytest.raises(ValueError, match="status='ok'"):
        ReportRow("a", "/a.svs", "ok", {})


# -- the page in a browser ----------------------------------------------------------------


def test_report_in_headless_chromium(tmp_path: Path, chromium_page) -> None:
    rows = _rows(tmp_path)
    path = write_report(tmp_path / "report.html", rows, title="Cohort <A> & friends", settings=SETTINGS,
                        wall_s=5400.0)
    page = chromium_page.page
    chromium_page.open(path)

    assert page.locator("table#slides tbody tr.slide").count() == len(rows)
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 4 + 3  # thumbnails of four rows, three charts
    assert all(w > 0 for w in widths), widths
    assert page.locator("td.thumb .no-thumb").count() == 1
    assert page.title() == "Cohort <A> & friends"
    assert page.locator("pre.error").first.inner_text() == LONG_ERROR  # in full, as text

    def ids() -> list[str]:
        return page.eval_on_selector_all("tr.slide td.slide-id .id", "cells => cells.map(c => c.textContent)")

    first = ids()
    assert first == [ODD_ID, "slide-4", "slide-5", "slide-2", "slide-10"]
    page.click("th:has-text('Slide')")
    assert ids() == ["slide-2", ODD_ID, "slide-4", "slide-5", "slide-10"]  # natural order
    page.click("th:has-text('Slide')")
    assert ids() == ["slide-10", "slide-5", "slide-4", ODD_ID, "slide-2"]
    page.click("th:has-text('Tissue mm²')")  # ascending, the row without a value last
    assert ids() == ["slide-5", "slide-2", ODD_ID, "slide-10", "slide-4"]

    page.click("button[data-filter-status='failed']")
    assert page.locator("tr.slide:visible").count() == 2
    page.click("button[data-filter-status='failed']")
    assert page.locator("tr.slide:visible").count() == len(rows)

    page.click("details.settings summary")
    page.click("th:has-text('Status')")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert chromium_page.errors == []
    assert chromium_page.external_requests == []
