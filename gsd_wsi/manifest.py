"""What to process: slide files, folders of slides, or CSV manifests, resolved to inputs.

A CSV manifest has a ``path`` column (relative paths are relative to the CSV's folder) and
optional ``slide_id`` and ``mpp`` columns, and per-slide tissue-detection overrides in
columns named as :class:`gsd_wsi.tissue.TissueConfig`'s fields (``thumb_mpp``,
``min_object_um2``, ``max_hole_um2``, ``closing_um``, ``remove_pen``; an empty cell keeps
the run's setting), and a ``model`` column for `segment` and `cohort`: this slide's model, a
folder (relative to the CSV's folder) or a built-in name such as ``nuclei`` (an empty cell
keeps the run's ``--model``), and an ``annotations`` column for `finetune` and `evaluate` on
slides: this slide's QuPath GeoJSON (relative to the CSV's folder). Other columns are ignored. Problems with one entry (a missing file, a bad
id, two slides with the same id) become failed inputs with a message; they never stop the
others.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsd_wsi.errors import ConfigError
from gsd_wsi.tissue import TissueConfig

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
    tissue: dict[str, Any] = field(default_factory=dict)  # TissueConfig fields that differ for this slide
    model: str | None = None      # this slide's segmentation model (a folder or built-in name); None: the run's
    annotations: Path | None = None  # this slide's QuPath GeoJSON (finetune, evaluate); None: found by name

    def tissue_config(self, base: TissueConfig) -> TissueConfig:
        return dataclasses.replace(base, **self.tissue) if self.tissue else base


def default_slide_id(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


_TISSUE_COLUMNS = {f.name: f.type for f in dataclasses.fields(TissueConfig)}


def _tissue_overrides(row: dict[str, Any], where: str) -> tuple[dict[str, Any], str | None]:
    """The row's tissue-detection overrides, validated by TissueConfig; or an error."""
    overrides: dict[str, Any] = {}
    for name in _TISSUE_COLUMNS:
        text = (row.get(name) or "").strip()
        if not text:
            continue
        if name == "remove_pen":
            if text.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                return {}, f"{where}: remove_pen {text!r} is not true or false"
            overrides[name] = text.lower() in {"true", "1", "yes"}
            continue
        try:
            overrides[name] = float(text)
        except ValueError:
            return {}, f"{where}: {name} {text!r} is not a number"
    try:
        dataclasses.replace(TissueConfig(), **overrides)
    except ConfigError as exc:
        return {}, f"{where}: {exc}"
    return overrides, None


def _from_manifest(csv_path: Path) -> list[SlideInput]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            return _manifest_rows(csv_path, csv.DictReader(fh))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{csv_path}: not a readable CSV manifest ({exc}); save it as UTF-8 CSV") from exc


def _model_cell(csv_path: Path, row: dict[str, Any]) -> str | None:
    """The row's ``model``: a folder relative to the CSV's, or a built-in name as written."""
    text = (row.get("model") or "").strip()
    if not text:
        return None
    folder = Path(text) if Path(text).is_absolute() else csv_path.parent / text
    return str(folder) if folder.exists() or "/" in text or "\\" in text else text


def _manifest_rows(csv_path: Path, reader: csv.DictReader) -> list[SlideInput]:
    if reader.fieldnames is None or "path" not in reader.fieldnames:
        raise ConfigError(f"{csv_path}: a manifest needs a 'path' column (optional: slide_id, mpp, model, annotations, "
                          f"{', '.join(_TISSUE_COLUMNS)})")
    inputs = []
    for row in reader:
        where = f"{csv_path}:{reader.line_num}"
        raw = (row.get("path") or "").strip()
        path = Path(raw) if Path(raw).is_absolute() else csv_path.parent / raw
        slide_id = (row.get("slide_id") or "").strip() or default_slide_id(path)
        mpp_text = (row.get("mpp") or "").strip()
        error = None if raw else f"{where}: empty path"
        if None in row:  # DictReader puts surplus cells under the key None
            error = f"{where}: {len(reader.fieldnames) + len(row[None])} cells, the header has {len(reader.fieldnames)}"
        mpp = None
        if mpp_text:
            try:
                mpp = float(mpp_text)
                if not mpp > 0:
                    raise ValueError
            except ValueError:
                error = error or f"{where}: mpp {mpp_text!r} is not a positive number"
        tissue, tissue_error = _tissue_overrides(row, where)
        annotations_text = (row.get("annotations") or "").strip()
        annotations = None
        if annotations_text:
            annotations = Path(annotations_text) if Path(annotations_text).is_absolute() else csv_path.parent / annotations_text
        inputs.append(SlideInput(path, slide_id, mpp, error or tissue_error, tissue, _model_cell(csv_path, row),
                                 annotations))
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
    inputs = [dataclasses.replace(i, mpp=i.mpp if i.mpp is not None else slide_mpp) for i in inputs]
    return check_ids(inputs)


def check_ids(inputs: list[SlideInput]) -> list[SlideInput]:
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
        checked.append(dataclasses.replace(item, error=error))
    return checked
