"""Aperio ImageScope XML polygons (the MoNuSeg nucleus format) and their rasterisation.

MoNuSeg ships one ``<Region>`` per nucleus, each with ``<Vertices><Vertex X=".." Y=".."/>``
in level-0 image pixels (``X`` is the column, ``Y`` the row). :func:`read_aperio_xml`
returns the polygons in file order, as ``(K, 2)`` float arrays of ``(x, y)``;
:func:`rasterise_instances` turns them into an int32 instance map with ids ``1..N``;
:func:`read_aperio_mpp` reads the resolution the file records (the root's ``MicronsPerPixel``,
0.2456-0.2527 um/px in MoNuSeg's files; the image TIFFs themselves record none).

Choices:
- A Region with fewer than 3 vertices encloses no area. By default it is **skipped with a
  warning** naming the file and region indices, and gets no id: the official MoNuSeg files
  contain such regions (one 2-vertex Region each in TCGA-50-5931 and TCGA-E2-A1B5), so
  refusing them would refuse the reference data. ``strict=True`` makes it an error naming
  the file and the region index (0-based, in file order).
- Always errors: a file that is not well-formed XML, a file with no Region at all (or only
  degenerate ones), a vertex with a missing / non-numeric / non-finite coordinate.
- Overlapping polygons: the later polygon in file order wins the shared pixels.
- A pixel belongs to a polygon when its centre (integer coordinates) lies inside it
  (``skimage.draw.polygon``); a sliver thinner than a pixel may therefore cover nothing,
  in which case its id is absent from the map.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon

from gsd_wsi.datasets import DatasetError

log = logging.getLogger(__name__)

MIN_VERTICES = 3  # fewer cannot enclose an area


def _coordinate(vertex: ET.Element, axis: str, path: Path, region_index: int) -> float:
    raw = vertex.get(axis)
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(
            f"{path}: region {region_index} has a vertex with {axis}={raw!r}, not a finite number; "
            "fix or remove that region"
        )
    return value


def read_aperio_xml(path: Path, strict: bool = False) -> list[np.ndarray]:
    """Polygons of every ``<Region>`` in ``path``, each ``(K, 2)`` float64 ``(x, y)`` pixels.

    Regions are taken in document order across all ``<Annotation>`` elements. Raises
    :class:`DatasetError` for unparsable XML, a file without Regions or a bad coordinate;
    Regions with fewer than 3 vertices are skipped with a warning (an error if ``strict``).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such annotation file") from exc
    except ET.ParseError as exc:
        raise DatasetError(
            f"{path}: not well-formed XML ({exc}); expected an Aperio ImageScope annotation file"
        ) from exc

    regions = list(root.iter("Region"))
    if not regions:
        raise DatasetError(
            f"{path}: no <Region> elements; expected Aperio XML with one <Region> polygon per object"
        )
    polygons: list[np.ndarray] = []
    skipped: list[int] = []
    for index, region in enumerate(regions):
        vertices = list(region.iter("Vertex"))
        if len(vertices) < MIN_VERTICES:
            if strict:
                raise DatasetError(
                    f"{path}: region {index} (Id={region.get('Id')!r}) has {len(vertices)} vertices; "
                    f"a polygon needs at least {MIN_VERTICES}"
                )
            skipped.append(index)
            continue
        xy = [(_coordinate(v, "X", path, index), _coordinate(v, "Y", path, index)) for v in vertices]
        polygons.append(np.asarray(xy, dtype=np.float64))
    if skipped:
        log.warning(
            "%s: skipped %d region(s) with fewer than %d vertices (indices %s)",
            path, len(skipped), MIN_VERTICES, skipped[:10],
        )
    if not polygons:
        raise DatasetError(f"{path}: none of the {len(regions)} regions has {MIN_VERTICES} or more vertices")
    log.debug("%s: %d polygons", path, len(polygons))
    return polygons


def read_aperio_mpp(path: Path) -> float | None:
    """The ``MicronsPerPixel`` of the root ``<Annotations>`` element; None when absent, 0 or not a number.

    Only the root's start tag is parsed, not the polygons.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            _, root = next(ET.iterparse(fh, events=("start",)))
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such annotation file") from exc
    except (ET.ParseError, StopIteration) as exc:
        raise DatasetError(f"{path}: not well-formed XML ({exc}); expected an Aperio ImageScope annotation file") from exc
    try:
        mpp = float(root.get("MicronsPerPixel", "nan"))
    except ValueError:
        return None
    return mpp if math.isfinite(mpp) and mpp > 0 else None


def rasterise_instances(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """An int32 ``shape`` (rows, cols) map: polygon ``i`` (0-based) is painted with id ``i + 1``.

    Later polygons overwrite earlier ones where they overlap; parts outside the image are
    clipped. Background is 0.
    """
    height, width = int(shape[0]), int(shape[1])
    if height <= 0 or width <= 0:
        raise DatasetError(f"cannot rasterise into an image of shape {shape}")
    if len(polygons) >= np.iinfo(np.int32).max:
        raise DatasetError(f"{len(polygons)} polygons do not fit int32 instance ids")
    instances = np.zeros((height, width), dtype=np.int32)
    for index, xy in enumerate(polygons):
        xy = np.asarray(xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] < MIN_VERTICES:
            raise DatasetError(f"polygon {index} has shape {xy.shape}; expected (K>={MIN_VERTICES}, 2) (x, y)")
        rows, cols = draw_polygon(xy[:, 1], xy[:, 0], shape=(height, width))
        instances[rows, cols] = index + 1
    return instances
