"""Cohort charts for the report, drawn with matplotlib's object API (no pyplot state) and
returned as ``data:image/svg+xml`` URIs: crisp, searchable text, nothing to fetch.

Distributions are strip plots, one row per class or stage: every slide a dot, the
interquartile range a bar and the median a tick. With many slides the dots are rasterised
inside the SVG, so the page does not grow by a vector element per slide.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from gsd_wsi.report.rows import ReportRow, class_names, failure_kinds, stage_names

MAX_VECTOR_DOTS = 300  # more dots in one chart than this and they are rasterised
RASTER_DPI = 150
WIDTH_IN = 4.6  # about the width of one chart column of the page, so text shows at its size
ROW_HEIGHT_IN = 0.42
FAILED_RGB = "#c62828"
_RC = {
    "svg.fonttype": "none",  # text stays text: small files, the page's font
    "svg.hashsalt": "gsd-wsi-report",  # stable element ids, identical output for identical input
    "font.size": 9,
    "font.family": "sans-serif",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#888888",
    "axes.titlesize": 10,
}


def class_area_chart(rows: Sequence[ReportRow]) -> str | None:
    """Area per slide (mm^2) of every class, one strip per class; ``None`` without areas."""
    groups = {name: [r.class_mm2[name] for r in rows if name in r.class_mm2] for name in class_names(rows)}
    return _strip_chart(groups, xlabel="area per slide (mm²)")


def seconds_chart(rows: Sequence[ReportRow]) -> str | None:
    """Seconds per slide of every stage, one strip per stage; ``None`` without timings."""
    groups = {name: [r.seconds[name] for r in rows if name in r.seconds] for name in stage_names(rows)}
    return _strip_chart(groups, xlabel="seconds per slide")


def failure_chart(rows: Sequence[ReportRow]) -> str | None:
    """Failed slides per error kind, most frequent on top; ``None`` when nothing failed."""
    kinds = failure_kinds(rows)
    if not kinds:
        return None
    labels = [kind for kind, _ in kinds]
    counts = np.array([count for _, count in kinds], dtype=np.float64)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(WIDTH_IN, _height_in(len(kinds))))
        ax = fig.add_subplot()
        y = np.arange(len(kinds))
        ax.barh(y, counts, height=0.6, color=FAILED_RGB)
        for yi, count in zip(y, counts, strict=True):
            ax.annotate(f"{int(count)}", (count, yi), xytext=(3, 0), textcoords="offset points", va="center")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlim(0, counts.max() * 1.15)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("failed slides")
        return _svg_uri(fig)


def _strip_chart(groups: Mapping[str, Sequence[float]], xlabel: str) -> str | None:
    finite = {name: np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
              for name, values in groups.items()}
    finite = {name: values for name, values in finite.items() if values.size}
    if not finite:
        return None
    n_dots = sum(values.size for values in finite.values())
    rng = np.random.default_rng(0)  # same jitter every time
    colours = matplotlib.colormaps["tab10"].colors
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(WIDTH_IN, _height_in(len(finite))))
        ax = fig.add_subplot()
        labels = []
        for i, (name, values) in enumerate(finite.items()):
            colour = colours[i % len(colours)]
            jitter = rng.uniform(-0.22, 0.22, values.size)
            ax.scatter(values, i + jitter, s=10, alpha=0.55, color=colour, linewidths=0,
                       rasterized=n_dots > MAX_VECTOR_DOTS)
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            ax.plot([q1, q3], [i, i], color="#333333", linewidth=3, solid_capstyle="butt", alpha=0.7)
            ax.plot([median], [i], marker="|", markersize=14, markeredgewidth=2, color="#111111")
            labels.append(f"{name}\nn={values.size}, median {_short(median)}")
        ax.set_yticks(range(len(finite)), labels)
        ax.set_ylim(len(finite) - 0.5, -0.5)
        ax.set_xlabel(xlabel)
        if min(values.min() for values in finite.values()) >= 0:
            ax.set_xlim(left=0)
        ax.grid(axis="x", color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        return _svg_uri(fig)


def _height_in(n_bars: int) -> float:
    return max(1.6, 0.7 + ROW_HEIGHT_IN * n_bars)


def _short(value: float) -> str:
    return f"{value:.3g}"


def _svg_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", dpi=RASTER_DPI, metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
