"""The data model of the cohort report: one :class:`ReportRow` per slide, and the cohort
facts the page is built from (status counts, class and stage columns, the initial order).

Rows are plain data made by the caller (``gsd-wsi cohort``); nothing here reads slides.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("done", "skipped", "failed", "no_tissue")
# Initial table order: failures first, then slides without tissue, then the rest.
STATUS_RANK = {"failed": 0, "no_tissue": 1, "done": 2, "skipped": 2}
UNKNOWN_KIND = "unknown"

_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class ReportRow:
    """What the report shows of one slide.

    ``status`` is the overall outcome; ``stage_status`` and ``seconds`` are keyed by stage
    name (``"tile"``, ``"segment"``). ``error`` is the full error text (any characters);
    ``error_kind`` a short category for the failure chart. ``thumbnail`` is the overlay or
    tissue picture, which may be absent or missing on disk.
    """

    slide_id: str
    slide_path: str
    status: str
    stage_status: dict[str, str]
    error: str = ""
    error_kind: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    tissue_mm2: float | None = None
    class_mm2: dict[str, float] = field(default_factory=dict)
    n_windows: int | None = None
    n_patches: int | None = None
    thumbnail: Path | None = None
    host: str = ""
    attempts: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"ReportRow {self.slide_id!r}: status={self.status!r} is not one of {STATUSES}")
        if self.attempts < 0:
            raise ValueError(f"ReportRow {self.slide_id!r}: attempts={self.attempts!r} must be >= 0")

    @property
    def failure_kind(self) -> str:
        """The category shown in the failure chart (``"unknown"`` when none was given)."""
        return self.error_kind.strip() or UNKNOWN_KIND

    @property
    def total_seconds(self) -> float:
        return float(sum(s for s in self.seconds.values() if math.isfinite(s)))


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``slide-2`` before ``slide-10`` (digit runs compare as numbers)."""
    parts = _DIGITS.split(text)
    return tuple((0, int(part)) if part.isdigit() else (1, part.casefold()) for part in parts if part)


def report_order(rows: Iterable[ReportRow]) -> list[ReportRow]:
    """Failed rows first, then ``no_tissue``, then done and skipped; each group by slide id."""
    return sorted(rows, key=lambda r: (STATUS_RANK[r.status], natural_key(r.slide_id), r.slide_id))


def status_counts(rows: Sequence[ReportRow]) -> dict[str, int]:
    """Rows per overall status, every status present (zeros included), in :data:`STATUSES` order."""
    counts = Counter(r.status for r in rows)
    return {status: counts.get(status, 0) for status in STATUSES}


def class_names(rows: Sequence[ReportRow]) -> list[str]:
    """Every class name present in any row, sorted naturally: one table column each."""
    names = {name for r in rows for name in r.class_mm2}
    return sorted(names, key=natural_key)


def stage_names(rows: Sequence[ReportRow]) -> list[str]:
    """Every stage named in any row, in order of first appearance (pipeline order)."""
    seen: dict[str, None] = {}
    for r in rows:
        for name in (*r.stage_status, *r.seconds):
            seen.setdefault(name, None)
    return list(seen)


def failure_kinds(rows: Sequence[ReportRow]) -> list[tuple[str, int]]:
    """``(error_kind, count)`` of the failed rows, most frequent first, then by name."""
    counts = Counter(r.failure_kind for r in rows if r.status == "failed")
    return sorted(counts.items(), key=lambda item: (-item[1], natural_key(item[0])))
