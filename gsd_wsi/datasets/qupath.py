"""QuPath's GeoJSON, as QuPath writes it (File > Export objects as GeoJSON), read into shapely.

Accepted: a ``FeatureCollection``, a bare array of features, or one ``Feature``. Per feature:

- ``geometry``: ``Polygon`` or ``MultiPolygon`` (with holes); for a QuPath *cell*, its
  ``nucleusGeometry`` when present (nuclei are what is learnt), else its cell outline. Points
  and lines label no pixel: they are skipped and counted.
- ``properties.objectType``: ``annotation``, ``detection``, ``cell``, ``tile``... (QuPath 0.2,
  which wrote no objectType, reads as ``annotation``).
- ``properties.classification.name`` (absent: unclassified), ``properties.name`` (an
  annotation's own name, e.g. of a region of interest).

Coordinates are level-0 pixels of the image as QuPath opened it, which for an OpenSlide slide
with ``openslide.bounds-x/-y`` starts at the bounds' corner; :mod:`gsd_wsi.datasets.slide_labels`
adds the offset. A self-intersecting ring is repaired (``shapely.make_valid``, its polygonal
parts kept) and counted, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from gsd_wsi.datasets import DatasetError

log = logging.getLogger(__name__)

POLYGONAL = ("Polygon", "MultiPolygon")


@dataclass(frozen=True)
class Feature:
    """One area object of the file, in the file's frame (QuPath's level-0 pixels)."""

    geometry: Polygon | MultiPolygon
    class_name: str | None          # None: unclassified
    object_type: str                # annotation, detection, cell, tile, ...
    name: str | None                # the object's own name (QuPath's "Name")
    index: int                      # position in the file, 0-based


@dataclass
class ReadReport:
    """What reading a file skipped or mended (each counted, then logged once)."""

    repaired: int = 0                       # rings that self-intersected, made valid
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such annotation file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read as text ({exc})") from exc
    if not text.strip():
        raise DatasetError(f"{path}: empty file; export the slide's objects from QuPath with "
                           "File > Export objects as GeoJSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from exc


def _features(data: Any, path: Path) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise DatasetError(f"{path}: a FeatureCollection without a 'features' list")
        return features
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise DatasetError(f"{path}: expected a GeoJSON FeatureCollection, a Feature or an array of features "
                       f"(got {type(data).__name__}{' of type ' + repr(data.get('type')) if isinstance(data, dict) else ''})")


def _class_name(properties: dict[str, Any]) -> str | None:
    classification = properties.get("classification")
    if isinstance(classification, dict):
        name = classification.get("name")
        return str(name) if name not in (None, "") else None
    if isinstance(classification, str) and classification:
        return classification
    return None


def _polygonal(geometry: Any, report: ReadReport) -> Polygon | MultiPolygon | None:
    """The feature's area as a valid (Multi)Polygon, or None (counted in ``report``)."""
    if not isinstance(geometry, dict) or geometry.get("type") not in POLYGONAL:
        kind = geometry.get("type") if isinstance(geometry, dict) else type(geometry).__name__
        report.skip(f"{kind} geometry (no area)")
        return None
    try:
        area = shape(geometry)
    except (ValueError, TypeError, AttributeError, IndexError, shapely.errors.GEOSException) as exc:
        raise DatasetError(f"malformed {geometry.get('type')} coordinates ({exc})") from exc
    if not area.is_valid:
        report.repaired += 1
        fixed = shapely.make_valid(area)
        parts = [g for g in getattr(fixed, "geoms", [fixed]) if isinstance(g, (Polygon, MultiPolygon))]
        area = shapely.union_all(parts) if parts else Polygon()
    if area.is_empty or area.area <= 0:
        report.skip("empty or zero-area polygon")
        return None
    return area


def read_qupath_geojson(path: str | Path) -> tuple[list[Feature], ReadReport]:
    """The area objects of a QuPath GeoJSON file in file order (see the module docstring), and
    what was repaired or skipped (also logged).

    Raises :class:`DatasetError` with the file's name for an empty or malformed file (the JSON
    error's line and column), a structure that is not GeoJSON features, or bad coordinates.
    """
    path = Path(path)
    raw_features = _features(_load_json(path), path)
    report = ReadReport()
    features: list[Feature] = []
    for index, raw in enumerate(raw_features):
        if not isinstance(raw, dict):
            raise DatasetError(f"{path}: feature {index} is a {type(raw).__name__}, not a GeoJSON Feature object")
        properties = raw.get("properties") or {}
        if not isinstance(properties, dict):
            raise DatasetError(f"{path}: feature {index} has properties that are not an object")
        object_type = str(properties.get("objectType") or raw.get("objectType") or "annotation")
        geometry = raw.get("nucleusGeometry") if object_type == "cell" and raw.get("nucleusGeometry") else raw.get("geometry")
        try:
            area = _polygonal(geometry, report)
        except DatasetError as exc:
            raise DatasetError(f"{path}: feature {index}: {exc}") from exc
        if area is None:
            continue
        name = properties.get("name")
        features.append(Feature(area, _class_name(properties), object_type, str(name) if name else None, index))
    if report.repaired:
        log.warning("%s: %d self-intersecting polygon(s) repaired (made valid, polygonal parts kept)",
                    path, report.repaired)
    for reason, count in sorted(report.skipped.items()):
        log.warning("%s: %d object(s) skipped: %s", path, count, reason)
    log.info("%s: %d area object(s) read", path, len(features))
    return features, report
