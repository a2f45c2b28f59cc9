"""The cohort report: ``OUT/report.html``, one self-contained page over every slide of a run.

A leaf package (numpy, Pillow, matplotlib)::

    from gsd_wsi.report import ReportRow, write_report

    rows = [ReportRow("s1", "/slides/s1.svs", "done", {"tile": "done", "segment": "done"},
                      seconds={"tile": 12.0, "segment": 40.5}, tissue_mm2=81.2,
                      class_mm2={"gland": 12.3}, thumbnail=out / "s1" / "overlay.png")]
    write_report(out / "report.html", rows, title="Cohort A", settings={"stages": ["tile", "segment"]},
                 wall_s=3600.0)
"""

from __future__ import annotations

from gsd_wsi.report.html import render_report, write_report
from gsd_wsi.report.rows import STATUSES, ReportRow, report_order

__all__ = ["STATUSES", "ReportRow", "render_report", "report_order", "write_report"]
