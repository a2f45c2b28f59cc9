"""The class mask as QuPath-importable GeoJSON: one polygon feature per connected region.

A region is a 4-connected set of mask pixels of one foreground class (index >= 1): two
pixels touching only at a corner are two regions, as when nuclei are labelled. Outlines
follow pixel edges (``rasterio.features.shapes``), so a region's polygon area is exactly its
pixel count; holes are interior rings.

Frames: polygons are traced in mask level-0 pixels, then written in slide level-0 pixels,
``xy_l0 = xy_mask * slide_downsample - offset_l0_xy``, rounded to 0.01 px. QuPath shows
OpenSlide images cropped to ``openslide.bounds-x/-y``, so pass those as the offset.
Areas are measured in the mask frame: ``pixels * mpp^2`` microns^2, exact.

Memory stays bounded whatever the slide height: level 0 is read in ``chunk_px`` squares,
one row band of chunks at a time. Polygons that touch no seam between chunks are final and
written at once. The others are dissolved, within the band, with the pieces they share an
edge with (same class) and with the regions still open from the band above; a dissolved
region that reaches the band's bottom seam stays open for the next band, any other is
final. So one real region is one feature, and only the regions crossing the current seam
are held. The file is streamed to a temporary name beside ``out_path`` and renamed.

:class:`DetectionWriter` streams one detection per object (an instance model's nuclei).

QuPath 0.6 needs: ``properties.classification`` with both ``name`` and ``color`` (else
parsing throws), rings that do not self-intersect (geometries are made valid, keeping the
polygonal parts), and ``objectType`` (``annotation`` by default; ``detection`` is lighter
when there are tens of thousands of nuclei).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Literal, TypeAlias

import numpy as np
import shapely
import zarr
from rasterio.features import shapes
from rasterio.transform import Affine
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry import shape as to_shapely

from gsd_wsi.errors import ConfigError
from gsd_wsi.masks.files import atomic_output
from gsd_wsi.masks.omezarr import open_label_level
from gsd_wsi.masks.palette import check_class_names, check_colors

log = logging.getLogger(__name__)

CONNECTIVITY = 4
COORD_DECIMALS = 2
AREA_KEY = "Area um^2"

Polygonal: TypeAlias = Polygon | MultiPolygon


def write_geojson(
    zarr_path: Path, out_path: Path, class_names: Sequence[str], colors: Sequence[Sequence[int]], mpp: float,
    slide_downsample: float, offset_l0_xy: tuple[float, float] = (0.0, 0.0), min_area_um2: float = 0.0,
    chunk_px: int = 2048, object_type: Literal["annotation", "detection"] = "annotation",
) -> dict[str, dict[str, float]]:
    """Write the regions of the label pyramid's level 0 as a GeoJSON FeatureCollection.

    ``mpp``: microns per mask pixel; ``slide_downsample``: slide level-0 pixels per mask
    pixel; ``offset_l0_xy``: subtracted from slide level-0 coordinates (the slide bounds).
    Regions smaller than ``min_area_um2`` (after dissolving across chunks) are left out.
    Returns, per foreground class name, ``{"features": n, "area_um2": a, "dropped": k}``.
    """
    names = check_class_names(class_names)
    colours = check_colors(colors, len(names))
    if not mpp > 0 or not slide_downsample > 0:
        raise ConfigError(f"mpp={mpp!r} and slide_downsample={slide_downsample!r} must be positive")
    if min_area_um2 < 0:
        raise ConfigError(f"min_area_um2={min_area_um2!r} must be >= 0")
    if chunk_px < 16:
        raise ConfigError(f"chunk_px={chunk_px!r} must be at least 16")
    if object_type not in ("annotation", "detection"):
        raise ConfigError(f"object_type={object_type!r}: expected 'annotation' or 'detection'")
    sink = _FeatureSink(names, colours, mpp, slide_downsample, offset_l0_xy, min_area_um2, object_type)

    out_path = Path(out_path)
    with atomic_output(out_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        sink.start(fh)
        for value, region in _regions(open_label_level(Path(zarr_path), 0), chunk_px, len(names)):
            sink.add(value, region)
        sink.end()
        fh.flush()
        os.fsync(fh.fileno())
    summary = sink.summary()
    log.info("GeoJSON %s: %d features (%d below %.3g um^2 left out)", out_path.name,
             sum(int(s["features"]) for s in summary.values()), sum(int(s["dropped"]) for s in summary.values()),
             min_area_um2)
    return summary


def _regions(level0: zarr.Array, chunk_px: int, n_classes: int) -> Iterator[tuple[int, Polygon]]:
    """(class, polygon in mask pixels) of every 4-connected region, each exactly once."""
    height, width = level0.shape
    open_regions: dict[int, list[Polygon]] = {}
    for y0 in range(0, height, chunk_px):
        y1 = min(y0 + chunk_px, height)
        seam_pieces: dict[int, list[Polygon]] = {value: list(polys) for value, polys in open_regions.items()}
        for x0 in range(0, width, chunk_px):
            x1 = min(x0 + chunk_px, width)
            chunk = np.asarray(level0[y0:y1, x0:x1])
            top = int(chunk.max())
            if top == 0:
                continue
            if top >= n_classes:
                raise ValueError(f"mask holds class {top} at rows {y0}..{y1}, but only {n_classes} classes are named")
            for geometry, value in shapes(chunk, mask=chunk > 0, connectivity=CONNECTIVITY,
                                          transform=Affine.translation(x0, y0)):
                polygon = to_shapely(geometry)
                minx, miny, maxx, maxy = polygon.bounds
                on_seam = ((minx == x0 and x0 > 0) or (maxx == x1 and x1 < width)
                           or (miny == y0 and y0 > 0) or (maxy == y1 and y1 < height))
                if on_seam:
                    seam_pieces.setdefault(int(value), []).append(polygon)
                else:
                    yield int(value), polygon
        open_regions = {}
        for value, pieces in seam_pieces.items():
            for region in _dissolve(pieces):
                if region.bounds[3] == y1 and y1 < height:
                    open_regions.setdefault(value, []).append(region)  # may continue in the next band
                else:
                    yield value, region
    assert not open_regions, "the last band leaves no region open"


def _dissolve(pieces: list[Polygon]) -> list[Polygon]:
    """Union the pieces that are connected through shared edges (not mere corners)."""
    if len(pieces) < 2:
        return pieces
    geoms = np.asarray(pieces, dtype=object)
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pairs = left < right
    left, right = left[pairs], right[pairs]
    if len(left):
        share_edge = shapely.relate_pattern(geoms[left], geoms[right], "****1****")  # boundaries meet in a line
        left, right = left[share_edge], right[share_edge]
    n = len(pieces)
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    n_groups, group_of = connected_components(graph, directed=False)
    order = np.argsort(group_of, kind="stable")
    bounds = np.searchsorted(group_of[order], np.arange(n_groups + 1))
    regions: list[Polygon] = []
    for g in range(n_groups):
        members = geoms[order[bounds[g]: bounds[g + 1]]]
        # simplify(0) drops the collinear vertices the seams leave; the outline is unchanged
        regions.append(members[0] if len(members) == 1 else shapely.simplify(shapely.union_all(members), 0.0))
    return regions


def _polygonal(geometry: shapely.Geometry) -> Polygonal | None:
    """A valid Polygon / MultiPolygon of the polygonal parts of ``geometry`` (None if none)."""
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    parts = [g for g in shapely.get_parts(geometry) if isinstance(g, Polygon) and not g.is_empty]
    # make_valid may return a GeometryCollection holding lines beside the polygons
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return MultiPolygon(parts)


class _FeatureSink:
    """Streams features into an open file and counts them per class."""

    def __init__(self, names: list[str], colours: list[tuple[int, int, int]], mpp: float, slide_downsample: float,
                 offset_l0_xy: tuple[float, float], min_area_um2: float, object_type: str) -> None:
        self.names, self.colours = names, colours
        self.um2_per_px = float(mpp) ** 2
        self.scale = float(slide_downsample)
        self.offset = np.asarray(offset_l0_xy, dtype=np.float64).reshape(1, 2)
        self.min_area_um2 = float(min_area_um2)
        self.object_type = object_type
        n = len(names)
        self.counts, self.dropped, self.areas = [0] * n, [0] * n, [0.0] * n
        self._fh: IO[str] | None = None
        self._first = True

    def start(self, fh: IO[str]) -> None:
        self._fh = fh
        fh.write('{"type":"FeatureCollection","features":[\n')

    def add(self, value: int, region_mask_px: Polygonal, measurements: dict[str, float] | None = None) -> None:
        geometry = _polygonal(region_mask_px)
        if geometry is None:
            return
        area_um2 = float(geometry.area) * self.um2_per_px  # pixel-edge outline: area = pixel count
        if area_um2 < self.min_area_um2:
            self.dropped[value] += 1
            return
        geometry_l0 = shapely.transform(geometry, self._to_l0)
        geometry_l0 = _polygonal(shapely.orient_polygons(geometry_l0))  # RFC 7946 ring order
        if geometry_l0 is None:  # cannot happen for pixel outlines: vertices are >= 1 px apart
            return
        properties = {
            "objectType": self.object_type,
            "classification": {"name": self.names[value], "color": list(self.colours[value])},
            "measurements": {AREA_KEY: area_um2, **(measurements or {})},
        }
        assert self._fh is not None
        self._fh.write(("" if self._first else ",\n") + '{"type":"Feature","geometry":'
                       + shapely.to_geojson(geometry_l0) + ',"properties":' + json.dumps(properties) + "}")
        self._first = False
        self.counts[value] += 1
        self.areas[value] += area_um2

    def _to_l0(self, xy_mask_px: np.ndarray) -> np.ndarray:
        return np.round(xy_mask_px * self.scale - self.offset, COORD_DECIMALS)

    def end(self) -> None:
        assert self._fh is not None
        self._fh.write("\n]}\n")

    def summary(self) -> dict[str, dict[str, float]]:
        return {self.names[i]: {"features": self.counts[i], "area_um2": self.areas[i], "dropped": self.dropped[i]}
                for i in range(1, len(self.names))}


class DetectionWriter:
    """Streams one QuPath ``detection`` per object into ``path`` as the objects are found.

    ``add(mask, y0, x0, measurements)`` traces the object's pixels (a bool crop whose top-left
    is mask pixel (x0, y0)) along pixel edges, so its area is its pixel count, and writes it
    in slide level-0 pixels minus ``offset_l0_xy``, as :func:`write_geojson` does, with
    ``"Area um^2"`` and the given measurements. An object whose pixels touch only at corners
    is one MultiPolygon. The caller owns the path (segment writes into its temporary folder)::

        with DetectionWriter(path, "nucleus", (255, 0, 255), mpp, downsample) as detections:
            detections.add(mask, y0, x0, {"Hematoxylin OD mean": 0.61})
    """

    def __init__(self, path: Path, class_name: str, color: Sequence[int], mpp: float, slide_downsample: float,
                 offset_l0_xy: tuple[float, float] = (0.0, 0.0), min_area_um2: float = 0.0) -> None:
        if not mpp > 0 or not slide_downsample > 0:
            raise ConfigError(f"mpp={mpp!r} and slide_downsample={slide_downsample!r} must be positive")
        names = check_class_names(["background", class_name])
        colours = check_colors([(0, 0, 0), color], 2)
        self.path = Path(path)
        self._sink = _FeatureSink(names, colours, mpp, slide_downsample, offset_l0_xy, min_area_um2, "detection")
        self._fh: IO[str] | None = None

    def __enter__(self) -> DetectionWriter:
        self._fh = open(self.path, "w", encoding="utf-8")
        self._sink.start(self._fh)
        return self

    def add(self, mask: np.ndarray, y0: int, x0: int, measurements: dict[str, float] | None = None) -> None:
        pieces = [to_shapely(g) for g, _ in shapes(mask.astype(np.uint8), mask=mask, connectivity=CONNECTIVITY,
                                                  transform=Affine.translation(x0, y0))]
        if pieces:
            self._sink.add(1, pieces[0] if len(pieces) == 1 else MultiPolygon(pieces), measurements)

    def __exit__(self, *exc: object) -> None:
        assert self._fh is not None
        if exc[0] is None:
            self._sink.end()
            self._fh.flush()
            os.fsync(self._fh.fileno())
        self._fh.close()

    def summary(self) -> dict[str, dict[str, float]]:
        """``{class: {"features": n, "area_um2": a, "dropped": k}}``, as :func:`write_geojson` returns."""
        return self._sink.summary()


def qupath_problems(path: Path, limit: int = 20) -> list[str]:
    """What in the GeoJSON at ``path`` QuPath (0.6) would refuse or misread; empty when none.

    The rules checked (the reasons are in the module docstring): a FeatureCollection of
    Features; Polygon or MultiPolygon geometries that are valid, with counter-clockwise
    exterior and clockwise interior rings (RFC 7946); ``properties.objectType`` ``annotation``
    or ``detection``; ``classification`` with a ``name`` and an RGB ``color``; ``measurements``
    a map of names to finite numbers. At most ``limit`` problems are listed.
    """
    problems: list[str] = []
    try:
        collection = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{path}: not readable JSON ({exc})"]
    if not isinstance(collection, dict) or collection.get("type") != "FeatureCollection":
        return [f"{path}: not a FeatureCollection"]
    for index, feature in enumerate(collection.get("features", [])):
        if len(problems) >= limit:
            break
        where = f"feature {index}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            problems.append(f"{where}: not a Feature")
            continue
        try:
            geometry = to_shapely(feature.get("geometry"))
        except (AttributeError, TypeError, ValueError, shapely.errors.GEOSException) as exc:
            problems.append(f"{where}: unreadable geometry ({exc})")
            continue
        if geometry.geom_type not in ("Polygon", "MultiPolygon"):
            problems.append(f"{where}: {geometry.geom_type}, not a Polygon or MultiPolygon")
        elif not geometry.is_valid:
            problems.append(f"{where}: invalid geometry ({shapely.is_valid_reason(geometry)})")
        elif any(not p.exterior.is_ccw or any(ring.is_ccw for ring in p.interiors) for p in shapely.get_parts(geometry)):
            problems.append(f"{where}: rings not in RFC 7946 order (exterior counter-clockwise, holes clockwise)")
        properties = feature.get("properties") or {}
        if properties.get("objectType") not in ("annotation", "detection"):
            problems.append(f"{where}: objectType {properties.get('objectType')!r}, not annotation or detection")
        classification = properties.get("classification")
        colour = classification.get("color") if isinstance(classification, dict) else None
        if not (isinstance(classification, dict) and isinstance(classification.get("name"), str)
                and isinstance(colour, list) and len(colour) == 3
                and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)):
            problems.append(f"{where}: classification needs a name and an RGB color, got {classification!r}")
        measurements = properties.get("measurements", {})
        if not (isinstance(measurements, dict) and all(
                isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in measurements.values())):
            problems.append(f"{where}: measurements must map names to finite numbers, got {measurements!r}")
    return problems
