"""What a slide's QuPath annotations label, and their label maps (leaf: numpy, shapely, rasterio).

Semantics (docs: README "Train from QuPath annotations"):

- An annotation of the **region-of-interest class** (``roi_class``, default QuPath's own
  ``Region*``) marks an area labelled exhaustively: inside it, every pixel no object covers is
  background (class 0).
- Every other classified area object (annotation, detection or cell) is an **object** of its
  class: its pixels are that class wherever it lies, inside an ROI or not, so a few Tumour and
  Stroma regions drawn on a slide label their own pixels. For the ``contour`` and ``distance``
  targets each object is one instance. A later object wins the pixels it shares with an earlier
  one (file order).
- An annotation of the **ignore class** (QuPath's ``Ignore*``) removes its pixels from the labels
  even inside an ROI.
- Everything else carries no label: :data:`IGNORE` in the maps, left out of the loss and the scores.
- Unclassified objects belong to the one object class when there is one; with several, they are
  an error.

Frames: the file's coordinates are level-0 pixels of the slide as QuPath shows it, which starts
at OpenSlide's bounds; ``l0 = file + bounds_l0_xy`` (the inverse of what `segment` writes, so a
round trip lands on the same pixels). A label map is drawn on the **mask** lattice of `segment`
(mask pixel (x, y) covers level-0 pixels (x*d, y*d) to ((x+1)*d, (y+1)*d), d = mask mpp / slide
mpp): a pixel takes a polygon's value when its centre lies inside it (``rasterio.features.rasterize``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.affinity import translate
from rasterio.features import rasterize
from rasterio.transform import Affine
from shapely.geometry import MultiPolygon, Polygon, box

from gsd_wsi.datasets import DatasetError
from gsd_wsi.datasets.qupath import Feature
from gsd_wsi.targets import IGNORE

log = logging.getLogger(__name__)

ROI_CLASS = "Region*"      # QuPath's built-in class for areas that are regions, not objects
IGNORE_CLASS = "Ignore*"   # QuPath's built-in class for areas to leave out
#: More than this fraction of the objects' area outside the slide: the file is another slide's.
FOREIGN_FRACTION = 0.5

Area = Polygon | MultiPolygon


@dataclass(frozen=True)
class LabelledArea:
    """One area to read from the slide: an ROI, or a group of objects drawn outside every ROI."""

    name: str                                   # the ROI's own name, else "<slide_id>#<k>"
    bounds_l0: tuple[float, float, float, float]  # (x0, y0, x1, y1) level-0 pixels
    labelled_l0: Area                           # the pixels it labels (for weighting and overlays)


@dataclass(frozen=True)
class SlideAnnotations:
    """A slide's annotations in level-0 pixels, sorted into ROIs, objects and ignored areas."""

    slide_id: str
    rois: tuple[Area, ...]
    objects: tuple[tuple[int, Area], ...]       # (class index >= 0, area), file order
    ignored: tuple[Area, ...]
    areas: tuple[LabelledArea, ...]
    clipped: int                                # objects cut at the slide's edge

    def label_maps(self, box_mask: tuple[int, int, int, int], downsample: float) -> tuple[np.ndarray, np.ndarray]:
        """``(classes int16 with IGNORE, instances int32)`` of the mask pixels ``(x0, y0, width, height)``.

        ``downsample``: level-0 pixels per mask pixel. Instances are numbered 1..N in file order
        of the objects that reach the box; classes are 0 inside ROIs, the object's class on it.
        """
        x0, y0, width, height = box_mask
        transform = Affine(downsample, 0.0, x0 * downsample, 0.0, downsample, y0 * downsample)
        window = box(x0 * downsample, y0 * downsample, (x0 + width) * downsample, (y0 + height) * downsample)
        shape_hw = (height, width)

        def draw(shapes: list[tuple[Area, int]], fill: int, dtype: type) -> np.ndarray:
            if not shapes:
                return np.full(shape_hw, fill, dtype)
            return rasterize(shapes, out_shape=shape_hw, transform=transform, fill=fill, dtype=dtype)

        near = [(c, a) for c, a in self.objects if a.intersects(window)]
        classes = draw([(roi, 0) for roi in self.rois if roi.intersects(window)], IGNORE, np.int16)
        if near:
            painted = draw([(a, c + 1) for c, a in near], 0, np.int16)  # 0: no object; class + 1 else
            classes = np.where(painted > 0, painted - 1, classes).astype(np.int16)
        instances = draw([(a, i) for i, (_, a) in enumerate(near, start=1)], 0, np.int32)
        ignored = [(a, 1) for a in self.ignored if a.intersects(window)]
        if ignored:
            out = draw(ignored, 0, np.uint8) > 0
            classes[out], instances[out] = IGNORE, 0
        return classes, instances


def class_names_of(features: Sequence[Feature], roi_class: str = ROI_CLASS,
                   ignore_class: str = IGNORE_CLASS) -> list[str]:
    """The object classes named in ``features`` (not the ROI and ignore classes), sorted."""
    return sorted({f.class_name for f in features if f.class_name not in (None, roi_class, ignore_class)})


def _check_frame(features: Sequence[Feature], slide_wh: tuple[int, int], source: str) -> None:
    """Refuse a file whose objects lie mostly off the slide: another slide's, or another scale's."""
    width, height = slide_wh
    slide_box = box(0, 0, width, height)
    total = sum(f.geometry.area for f in features)
    outside = sum(f.geometry.difference(slide_box).area for f in features)
    if total and outside / total > FOREIGN_FRACTION:
        x1 = max(f.geometry.bounds[2] for f in features)
        y1 = max(f.geometry.bounds[3] for f in features)
        scale = max(x1 / width, y1 / height)
        hint = (f" (they reach x={x1:.0f}, y={y1:.0f}, {scale:.1f}x the slide: exported at another level or scale? "
                "QuPath exports level-0 pixels of the image it opened)") if scale > 1.5 else ""
        raise DatasetError(f"{source}: {100 * outside / total:.0f} % of the objects' area lies outside the slide's "
                           f"{width} x {height} level-0 pixels{hint}; is this another slide's annotation file?")


def _group_outside(objects: list[Area], rois: list[Area], gap_l0: float) -> list[Area]:
    """Objects outside every ROI, grouped into areas: those closer than ``gap_l0`` share one."""
    covered = shapely.union_all(rois) if rois else Polygon()
    loose = [a for a in objects if not covered.contains(a)]
    if not loose:
        return []
    merged = shapely.union_all([a.buffer(gap_l0 / 2) for a in loose])
    groups = list(getattr(merged, "geoms", [merged]))
    return [shapely.union_all([a for a in loose if a.intersects(g)]) for g in groups]


def sort_annotations(features: Sequence[Feature], slide_id: str, slide_wh: tuple[int, int],
                     bounds_l0_xy: tuple[int, int], class_names: Sequence[str], source: str,
                     roi_class: str = ROI_CLASS, ignore_class: str = IGNORE_CLASS,
                     group_gap_l0: float = 512.0) -> SlideAnnotations:
    """A slide's features as ROIs, objects of ``class_names`` (index 0 is background) and ignored areas.

    Raises :class:`DatasetError` naming ``source`` for a file that is mostly off the slide, a
    class outside ``class_names`` (all listed), unclassified objects with several object
    classes, or nothing labelled. Objects cut by the slide's edge are clipped and counted.
    """
    offset_x, offset_y = bounds_l0_xy
    moved = [Feature(translate(f.geometry, offset_x, offset_y), f.class_name, f.object_type,
                     f.name, f.index) for f in features]
    if not moved:
        raise DatasetError(f"{source}: no area objects; draw {roi_class!r} annotations around exhaustively labelled "
                           "areas, or classified areas (e.g. Tumor, Stroma) or objects (nuclei)")
    _check_frame(moved, slide_wh, source)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(class_names_of(moved, roi_class, ignore_class)) - set(index))
    if unknown:
        raise DatasetError(f"{source}: class(es) {', '.join(map(repr, unknown))} are not among the classes "
                           f"{', '.join(map(repr, class_names))}; add them to --class-names, or reclassify them "
                           f"(regions of interest: {roi_class!r}, areas to leave out: {ignore_class!r})")
    unclassified = sum(f.class_name is None for f in moved)
    if unclassified and len(class_names) != 2:
        raise DatasetError(f"{source}: {unclassified} unclassified object(s) and {len(class_names) - 1} object classes "
                           f"({', '.join(class_names[1:])}): classify them in QuPath")
    slide_box = box(0, 0, *slide_wh)
    rois: list[tuple[Area, str | None]] = []
    objects: list[tuple[int, Area]] = []
    ignored: list[Area] = []
    clipped = 0
    for f in moved:
        area = f.geometry
        if not slide_box.contains(area):
            clipped += 1
            area = area.intersection(slide_box)
            if area.is_empty or area.area <= 0:
                continue
        if f.class_name == roi_class:
            rois.append((area, f.name))
        elif f.class_name == ignore_class:
            ignored.append(area)
        else:
            objects.append((index[f.class_name] if f.class_name is not None else 1, area))
    if clipped:
        log.warning("%s: %d object(s) reach beyond the slide's edge and are clipped to it", source, clipped)
    if not rois and not objects:
        raise DatasetError(f"{source}: nothing is labelled (only {ignore_class!r} areas); draw {roi_class!r} annotations "
                           "around exhaustively labelled areas, or classified areas or objects")
    areas: list[LabelledArea] = []
    for k, (roi, name) in enumerate(rois, start=1):
        areas.append(LabelledArea(name or f"{slide_id}#{k}", roi.bounds, roi))
    for group in _group_outside([a for _, a in objects], [r for r, _ in rois], group_gap_l0):
        areas.append(LabelledArea(f"{slide_id}#{len(areas) + 1}", group.bounds, group))
    names = Counter(a.name for a in areas)
    repeated = sorted(n for n, c in names.items() if c > 1)
    if repeated:
        raise DatasetError(f"{source}: regions of interest share the name(s) {', '.join(map(repr, repeated))}; "
                           "names are what splits use, so give each its own or none")
    return SlideAnnotations(slide_id, tuple(r for r, _ in rois), tuple(objects), tuple(ignored), tuple(areas), clipped)


def mask_box(bounds_l0: tuple[float, float, float, float], downsample: float, min_px: int,
             mask_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(x0, y0, width, height)`` mask pixels covering ``bounds_l0``, grown (centred) to at least
    ``min_px`` a side for context and crops, kept within the mask where it is large enough."""
    x0, y0 = math.floor(bounds_l0[0] / downsample), math.floor(bounds_l0[1] / downsample)
    x1, y1 = math.ceil(bounds_l0[2] / downsample), math.ceil(bounds_l0[3] / downsample)
    out = []
    for lo, hi, size in ((x0, x1, mask_wh[0]), (y0, y1, mask_wh[1])):
        lo, hi = max(0, lo), min(size, hi)
        if hi - lo < min_px:  # centred on the area, moved inside the slide; a smaller slide: all of it
            lo = min(max(int(round((lo + hi - min_px) / 2)), 0), max(size - min_px, 0))
            hi = min(lo + min_px, size)
        out += [lo, hi]
    return out[0], out[2], out[1] - out[0], out[3] - out[2]
