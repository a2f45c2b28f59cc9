"""What to process: slide files, folders of slides, or CSV manifests, resolved to inputs.

A CSV manifest has a ``path`` column (relative paths are relative to the CSV's folder) and
optional ``slide_id`` and ``mpp`` columns. Problems with one entry (a missing file, a bad
id, two slides with the same id) become failed inputs with a message; they never stop the
others.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from gsd_wsi.errors import ConfigError

#: Suffixes taken from folders: OpenSlide's formats, plain images, optional-reader formats.
SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
    ".png", ".jpg", ".jpeg", ".bmp", ".jp2",
})
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class SlideInput:
    path: Path
    slide_id: str
    mpp: float | None = None      # resolution to use when the file has none
    error: str | None = None      # set when the entry cannot be processed


def default_slide_id(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _from_manifest(csv_path: Path) -> list[SlideInput]:
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ConfigError(f"{csv_path}: a manifest needs a 'path' column (optional: slide_id, mpp)")
        inputs = []
        for line_no, row in enumerate(reader, start=2):
            raw = (row.get("path") or "").strip()
            path = Path(raw) if Path(raw).is_absolute() else csv_path.parent / raw
            slide_id = (row.get("slide_id") or "").strip() or default_slide_id(path)
            mpp_text = (row.get("mpp") or "").strip()
            error = None if raw else f"{csv_path}:{line_no}: empty path"
            mpp = None
            if mpp_text:
                try:
                    mpp = float(mpp_text)
                except ValueError:
                    error = f"{csv_path}:{line_no}: mpp {mpp_text!r} is not a number"
            inputs.append(SlideInput(path, slide_id, mpp, error))
    return inputs


def collect_inputs(sources: list[str | Path], slide_mpp: float | None = None) -> list[SlideInput]:
    """Expand files, folders and CSV manifests into one list of inputs, in the given order.

    ``slide_mpp`` is the fallback resolution for inputs whose manifest gives none.
    """
    inputs: list[SlideInput] = []
    for source in map(Path, sources):
        if source.is_dir() and not source.name.lower().endswith(".zarr"):
            files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not files:
                inputs.append(SlideInput(source, default_slide_id(source), error=f"{source}: no slide files in this folder"))
            inputs.extend(SlideInput(p, default_slide_id(p)) for p in files)
        elif source.suffix.lower() == ".csv" and source.is_file():
            inputs.extend(_from_manifest(source))
        else:
            error = None if source.exists() else f"{source}: no such file or folder"
            inputs.append(SlideInput(source, default_slide_id(source), error=error))
    inputs = [
        SlideInput(i.path, i.slide_id, i.mpp if i.mpp is not None else slide_mpp, i.error) for i in inputs
    ]
    return _check_ids(inputs)


def _check_ids(inputs: list[SlideInput]) -> list[SlideInput]:
    """Mark unsafe ids and every input of a duplicated id as failed (which one is meant is unknowable)."""
    by_id: dict[str, list[Path]] = defaultdict(list)
    for item in inputs:
        by_id[item.slide_id].append(item.path)
    checked = []
    for item in inputs:
        error = item.error
        if error is None and not _SAFE_ID.match(item.slide_id):
            error = (
                f"slide id {item.slide_id!r} may only use letters, digits and . _ + - (and not start with "
                f"one of them); set a slide_id column in a CSV manifest"
            )
        elif error is None and len(by_id[item.slide_id]) > 1:
            others = ", ".join(str(p) for p in by_id[item.slide_id])
            error = f"slide id {item.slide_id!r} is shared by {others}; give distinct slide_id values in a CSV manifest"
        checked.append(SlideInput(item.path, item.slide_id, item.mpp, error))
    return checked
