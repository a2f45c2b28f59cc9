"""The cohort report page: one self-contained HTML file, ``OUT/report.html``.

Everything the page shows is inside it (thumbnails as base64 JPEG, charts as base64 SVG,
inline CSS and a small sorting/filtering script), so it opens from disk with no server
and no network and can be forwarded as one file. Thumbnails link to the full-size
pictures by relative paths, which work while the report stays in its output folder.
Every piece of text from the rows or the settings is HTML-escaped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from html import escape
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gsd_wsi import __version__
from gsd_wsi.atomic import atomic_write_text
from gsd_wsi.report import plots
from gsd_wsi.report.rows import (
    STATUS_RANK,
    STATUSES,
    ReportRow,
    class_names,
    report_order,
    stage_names,
    status_counts,
)
from gsd_wsi.report.thumbs import EmbeddedImage, embed_thumbnails

log = logging.getLogger(__name__)

STATUS_LABELS = {"done": "done", "skipped": "skipped", "failed": "failed", "no_tissue": "no tissue"}
_STAGE_OK = {"done", "ok", "skipped"}  # stage states that need no badge beside the seconds
_MISSING = "–"


def write_report(
    path: Path,
    rows: Sequence[ReportRow],
    *,
    title: str,
    settings: Mapping[str, Any],
    wall_s: float | None = None,
) -> Path:
    """Write the cohort report to ``path`` atomically and return ``path``.

    ``settings`` describes what made the run (stages, model, version, scheduler) and is
    shown in a collapsible block; ``wall_s`` is the run's wall-clock time, from which the
    header derives slides per hour. Thumbnail links are made relative to ``path.parent``.
    """
    path = Path(path)
    page = render_report(rows, title=title, settings=settings, wall_s=wall_s, report_dir=path.parent)
    atomic_write_text(path, page)
    log.info("report of %d slides written to %s (%.1f kB)", len(rows), path, len(page.encode()) / 1e3)
    return path


def render_report(
    rows: Sequence[ReportRow],
    *,
    title: str,
    settings: Mapping[str, Any],
    wall_s: float | None = None,
    report_dir: Path,
) -> str:
    """The page as a string (see :func:`write_report`); ``report_dir`` anchors the relative links."""
    ordered = report_order(rows)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([
        _header(title, ordered, wall_s, generated),
        _settings_block(settings),
        _charts(ordered),
        _table(ordered, Path(report_dir)),
    ])
    return _PAGE.format(
        title=escape(title),
        css=_asset("report.css"),
        body=body,
        footer=escape(f"gsd-wsi {__version__} · generated {generated}"),
        script=_asset("report.js"),
    )


def _asset(name: str) -> str:
    return (files("gsd_wsi.report") / "assets" / name).read_text(encoding="utf-8")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="gsd-wsi">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>
{css}</style>
</head>
<body>
{body}
<footer>{footer}</footer>
<script>
{script}</script>
</body>
</html>
"""


# -- header, settings, charts -------------------------------------------------------------


def _header(title: str, rows: Sequence[ReportRow], wall_s: float | None, generated: str) -> str:
    counts = status_counts(rows)
    cards = [_card("slides", str(len(rows)), filter_status="")]
    cards += [_card(STATUS_LABELS[s], str(counts[s]), filter_status=s, status=s) for s in STATUSES]
    if wall_s is not None and math.isfinite(wall_s) and wall_s >= 0:
        cards.append(_card("wall time", _duration(wall_s)))
        processed = len(rows) - counts["skipped"]
        if wall_s > 0:
            rate = processed / wall_s * 3600.0
            cards.append(_card("slides / hour", f"{rate:.1f}" if rate < 100 else f"{rate:,.0f}",
                               hint=f"{processed} slides processed in this run (skipped ones not counted)"))
    return (f'<header class="top"><h1>{escape(title)}</h1>'
            f'<p class="sub">Generated {escape(generated)} · gsd-wsi {escape(__version__)}</p>'
            f'<div class="cards">{"".join(cards)}</div></header>')


def _card(label: str, value: str, *, filter_status: str | None = None, status: str = "",
          hint: str = "") -> str:
    cls = f"card st-{status}" if status else "card"
    content = f'<span class="v">{escape(value)}</span><span class="k">{escape(label)}</span>'
    if filter_status is None:
        title = f' title="{escape(hint)}"' if hint else ""
        return f'<div class="{cls}"{title}>{content}</div>'
    return (f'<button type="button" class="{cls}" data-filter-status="{escape(filter_status)}" '
            f'title="{escape(hint or "show only these slides")}">{content}</button>')


def _settings_block(settings: Mapping[str, Any]) -> str:
    if not settings:
        items = '<p class="note">No settings recorded.</p>'
    else:
        rows = "".join(f"<tr><th>{escape(str(key))}</th><td>{_setting_value(value)}</td></tr>"
                       for key, value in settings.items())
        items = f'<table class="settings">{rows}</table>'
    return f'<details class="settings"><summary>Run settings</summary>{items}</details>'


def _setting_value(value: Any) -> str:
    if isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
        return f"<pre>{escape(text)}</pre>"
    return f"<code>{escape(str(value))}</code>"


def _charts(rows: Sequence[ReportRow]) -> str:
    figures = [
        ("Class area per slide", plots.class_area_chart(rows), "No class areas recorded."),
        ("Seconds per slide, by stage", plots.seconds_chart(rows), "No timings recorded."),
        ("Failures by kind", plots.failure_chart(rows), "No failures."),
    ]
    parts = []
    for caption, uri, empty_note in figures:
        content = (f'<img src="{escape(uri)}" alt="{escape(caption)}">' if uri is not None
                   else f'<p class="note">{escape(empty_note)}</p>')
        parts.append(f"<figure><figcaption>{escape(caption)}</figcaption>{content}</figure>")
    return f'<section class="charts">{"".join(parts)}</section>'


# -- the slide table ----------------------------------------------------------------------


def _table(rows: Sequence[ReportRow], report_dir: Path) -> str:
    classes = class_names(rows)
    stages = stage_names(rows)
    # (label, unit, sort type, class): units go on a second header line to keep columns narrow
    headers = [("thumbnail", "", "none", "thumb"), ("Slide", "", "text", ""), ("Status", "", "num", "")]
    headers += [("Tissue", "mm²", "num", "")]
    headers += [(name, "mm²", "num", "class") for name in classes]
    headers += [("Windows", "", "num", ""), ("Patches", "", "num", "")]
    headers += [(name, "s", "num", "stage") for name in stages]
    headers += [("Host", "", "text", ""), ("Attempts", "", "num", ""), ("Error", "", "text", "error")]
    head = "".join(_th(*header) for header in headers)
    if rows:
        images = embed_thumbnails([r.thumbnail for r in rows])
        body = "\n".join(_row(r, image, classes, stages, report_dir) for r, image in zip(rows, images, strict=True))
    else:
        body = f'<tr class="empty"><td colspan="{len(headers)}">No slides in this run.</td></tr>'
    toolbar = ('<div class="toolbar"><input type="search" id="filter" placeholder="Filter slides…" '
               'aria-label="filter slides by any text"><span id="shown"></span>'
               '<span class="hint">Click a column header to sort.</span></div>')
    return (f'<section class="slides">{toolbar}<table id="slides"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table></section>")


def _th(label: str, unit: str, sort_kind: str, cls: str) -> str:
    classes = " ".join(c for c in (cls, "num" if sort_kind == "num" else "") if c)
    class_attr = f' class="{classes}"' if classes else ""
    if sort_kind == "none":
        return f'<th{class_attr} scope="col"><span class="sr">{escape(label)}</span></th>'
    unit_html = f' <span class="unit">{escape(unit)}</span>' if unit else ""
    return (f'<th{class_attr} scope="col" data-sort-type="{sort_kind}" tabindex="0" aria-sort="none">'
            f'<span class="label">{escape(label)}</span>{unit_html}</th>')


def _row(r: ReportRow, image: EmbeddedImage | None, classes: Iterable[str], stages: Iterable[str],
         report_dir: Path) -> str:
    cells = [
        _thumb_cell(r.thumbnail, image, report_dir),
        _slide_cell(r),
        _td(f'<span class="badge st-{r.status}">{escape(STATUS_LABELS[r.status])}</span>',
            sort=STATUS_RANK[r.status]),
        _num_td(r.tissue_mm2, _mm2),
    ]
    cells += [_num_td(r.class_mm2.get(name), _mm2) for name in classes]
    cells += [_num_td(r.n_windows, _count), _num_td(r.n_patches, _count)]
    cells += [_stage_cell(r, name) for name in stages]
    cells += [_td(escape(r.host) or _MISSING, sort=r.host)]
    cells += [_td(str(r.attempts), sort=r.attempts, cls="num retried" if r.attempts > 1 else "num")]
    cells += [_error_cell(r)]
    return f'<tr class="slide" data-status="{escape(r.status)}">{"".join(cells)}</tr>'


def _td(html: str, *, sort: object = None, cls: str = "") -> str:
    sort_attr = "" if sort is None else f' data-sort="{escape(str(sort))}"'
    class_attr = f' class="{cls}"' if cls else ""
    return f"<td{class_attr}{sort_attr}>{html}</td>"


def _num_td(value: float | None, fmt: Callable[[float], str]) -> str:
    if value is None or not math.isfinite(value):
        return _td(_MISSING, sort="", cls="num missing")
    return _td(fmt(value), sort=repr(value), cls="num")


def _thumb_cell(thumbnail: Path | None, image: EmbeddedImage | None, report_dir: Path) -> str:
    if thumbnail is None:
        return '<td class="thumb"><div class="no-thumb">no image</div></td>'
    if image is None:
        return (f'<td class="thumb"><div class="no-thumb" title="{escape(str(thumbnail))}">'
                "image missing</div></td>")
    img = (f'<img src="{image.data_uri}" width="{image.width_px}" height="{image.height_px}" '
           f'alt="thumbnail" decoding="async">')
    return f'<td class="thumb"><a href="{escape(_relative_href(thumbnail, report_dir))}" target="_blank">{img}</a></td>'


def _relative_href(target: Path, report_dir: Path) -> str:
    """A URL to ``target`` relative to the report's folder (absolute ``file:`` where none exists)."""
    target = Path(os.path.abspath(target))
    try:
        relative = os.path.relpath(target, os.path.abspath(report_dir))
    except ValueError:  # another drive on Windows
        return target.as_uri()
    return quote(Path(relative).as_posix())


def _slide_cell(r: ReportRow) -> str:
    # a line may break after any "/" of the path, nowhere else
    breakable = "/<wbr>".join(escape(part) for part in r.slide_path.split("/"))
    path = f'<div class="path">{breakable}</div>' if r.slide_path else ""
    return _td(f'<div class="id">{escape(r.slide_id)}</div>{path}', sort=r.slide_id, cls="slide-id")


def _stage_cell(r: ReportRow, stage: str) -> str:
    seconds = r.seconds.get(stage)
    state = r.stage_status.get(stage, "")
    text = _MISSING if seconds is None or not math.isfinite(seconds) else f"{seconds:,.1f}"
    badge = ""
    if state and state not in _STAGE_OK:
        badge = f'<span class="badge small st-{escape(state)}">{escape(state)}</span>'
    sort = "" if seconds is None or not math.isfinite(seconds) else repr(seconds)
    return _td(f"{text}{badge}", sort=sort, cls="num stage")


def _error_cell(r: ReportRow) -> str:
    if not r.error and not r.error_kind:
        return _td("", sort="", cls="error")
    kind = f'<span class="kind">{escape(r.failure_kind)}</span>' if r.status == "failed" or r.error_kind else ""
    text = f'<pre class="error">{escape(r.error)}</pre>' if r.error else ""
    return _td(kind + text, sort=f"{r.failure_kind} {r.error}", cls="error")


# -- number formats -----------------------------------------------------------------------


def _mm2(value: float) -> str:
    return f"{value:,.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"


def _count(value: float) -> str:
    return f"{int(value):,}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"

