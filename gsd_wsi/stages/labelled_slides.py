"""Labelled areas of annotated slides, for `finetune` and `evaluate` on slides with QuPath GeoJSON.

Each area (a region of interest, or a group of objects drawn outside every ROI; see
gsd_wsi/datasets/slide_labels.py) is read from the slide's pyramid at the model's resolution
with `segment`'s own reader: the mask lattice of :func:`~gsd_wsi.stages.segment_windows.mask_frame`,
the level just finer than the model's mpp, each window resized once (`tile`'s ``read_tiles``).
Only the areas are read, in ``CHUNK_PX`` windows, so memory and time follow the labelled area,
never the slide.

The pixels (before stain normalisation) and label maps are cached once per slide in
``CACHE/<slide_id>.zarr``, keyed by the slide and annotation files (size, mtime, SHA-256 of the
annotations) and the settings that shape them; a run that is resumed, or scored again, reads
the store instead of decoding the slide. The store is written under a temporary name and
renamed when complete. Stain normalisation, when the model uses it, is fitted once per slide on
the pixels of all its areas, then applied to each.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from gsd_wsi import __version__
from gsd_wsi.atomic import atomic_dir
from gsd_wsi.datasets import DatasetError
from gsd_wsi.datasets.qupath import read_qupath_geojson
from gsd_wsi.datasets.slide_labels import IGNORE, IGNORE_CLASS, ROI_CLASS, class_names_of, mask_box, sort_annotations
from gsd_wsi.manifest import SlideInput
from gsd_wsi.slide import open_slide
from gsd_wsi.stages.segment_windows import mask_frame
from gsd_wsi.stages.tile import read_tiles
from gsd_wsi.stain import StainNormalizer

log = logging.getLogger(__name__)

CHUNK_PX = 1024            # mask pixels per side of one read
ANNOTATION_SUFFIXES = (".geojson", ".json")
STORE_FORMAT = 1


@dataclass(frozen=True)
class SlideArea:
    """One labelled area at the model's resolution: pixels, classes (:data:`IGNORE` where
    unlabelled) and instances (0: none)."""

    name: str
    slide_id: str
    image: np.ndarray       # (H, W, 3) uint8
    classes: np.ndarray     # (H, W) int16
    instances: np.ndarray   # (H, W) int32
    box_mask: tuple[int, int, int, int]  # (x0, y0, width, height) on the slide's mask lattice
    mpp: float

    @property
    def labelled(self) -> np.ndarray:
        return self.classes != IGNORE


@dataclass(frozen=True)
class AreaSettings:
    """What shapes the cached areas (their cache key, with the files)."""

    model_mpp: float
    class_names: tuple[str, ...]
    roi_class: str = ROI_CLASS
    ignore_class: str = IGNORE_CLASS
    min_px: int = 256       # an area smaller than this is read with context around it


def annotation_path(item: SlideInput, annotations: Path | None) -> Path:
    """Where ``item``'s annotations are: its manifest's ``annotations`` cell, ``annotations`` (a file,
    or a folder holding ``<slide stem or id>.geojson``), else ``<slide stem>.geojson`` beside the slide."""
    if item.annotations is not None:
        candidates = [item.annotations]
    elif annotations is not None and annotations.is_file():
        candidates = [annotations]
    else:
        folder = annotations if annotations is not None else item.path.parent
        stems = dict.fromkeys((item.path.stem, item.slide_id, item.path.name.split(".")[0]))
        candidates = [folder / f"{stem}{suffix}" for stem in stems for suffix in ANNOTATION_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{item.slide_id}: no annotations found (looked for {', '.join(str(c) for c in candidates[:2])}"
                       f"{'...' if len(candidates) > 2 else ''}); give --annotations or an 'annotations' manifest column")


def read_class_names(paths: Sequence[Path], roi_class: str = ROI_CLASS, ignore_class: str = IGNORE_CLASS) -> list[str]:
    """The object classes named across annotation files, sorted (the run's classes after background)."""
    names: set[str] = set()
    for path in paths:
        names.update(class_names_of(read_qupath_geojson(path)[0], roi_class, ignore_class))
    return sorted(names)


def _file_key(path: Path, digest: bool) -> dict[str, Any]:
    stat = path.stat()
    key: dict[str, Any] = {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if digest:
        key["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return key


def _cache_key(item: SlideInput, annotations: Path, settings: AreaSettings) -> dict[str, Any]:
    return {"format": STORE_FORMAT, "slide": _file_key(item.path, digest=False), "slide_mpp": item.mpp,
            "annotations": _file_key(annotations, digest=True), "model_mpp": settings.model_mpp,
            "class_names": list(settings.class_names), "roi_class": settings.roi_class,
            "ignore_class": settings.ignore_class, "min_px": settings.min_px}


def _read_box(slide: Any, frame: Any, box_mask: tuple[int, int, int, int]) -> np.ndarray:
    """The mask pixels ``(x0, y0, width, height)`` as RGB, read in ``CHUNK_PX`` windows."""
    x0, y0, width, height = box_mask
    out = np.empty((height, width, 3), np.uint8)
    for cy in range(0, height, CHUNK_PX):
        for cx in range(0, width, CHUNK_PX):
            xy = np.array([[x0 + cx, y0 + cy]])
            chunk = read_tiles(slide, frame.level, frame.level_xy(xy), frame.read_px(CHUNK_PX), CHUNK_PX)[0]
            h, w = min(CHUNK_PX, height - cy), min(CHUNK_PX, width - cx)
            out[cy:cy + h, cx:cx + w] = chunk[:h, :w]
    return out


def _extract(item: SlideInput, annotations: Path, settings: AreaSettings) -> list[SlideArea]:
    features, _ = read_qupath_geojson(annotations)
    with open_slide(item.path, mpp=item.mpp) as slide:
        sorted_annotations = sort_annotations(features, item.slide_id, slide.dimensions, slide.bounds_l0_xy,
                                              settings.class_names, str(annotations), settings.roi_class,
                                              settings.ignore_class)
        frame = mask_frame(slide, settings.model_mpp)
        areas = []
        for area in sorted_annotations.areas:
            box_mask = mask_box(area.bounds_l0, frame.downsample, settings.min_px, (frame.width_px, frame.height_px))
            classes, instances = sorted_annotations.label_maps(box_mask, frame.downsample)
            if not (classes != IGNORE).any():
                log.warning("%s: area %s covers no pixel centre at %.3g um/px; left out", annotations, area.name, frame.mpp)
                continue
            areas.append(SlideArea(area.name, item.slide_id, _read_box(slide, frame, box_mask), classes, instances,
                                   box_mask, frame.mpp))
    return areas


def _write_store(path: Path, key: dict[str, Any], areas: list[SlideArea]) -> None:
    with atomic_dir(path) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        for i, area in enumerate(areas):
            for name in ("image", "classes", "instances"):
                value = getattr(area, name)
                group.create_array(f"{i}/{name}", data=value, chunks=(min(512, value.shape[0]), min(512, value.shape[1]))
                                   + value.shape[2:])
        group.attrs.update({"key": key, "gsd_wsi_version": __version__,
                            "areas": [{"name": a.name, "box_mask": list(a.box_mask), "mpp": a.mpp} for a in areas]})


def _read_store(path: Path, key: dict[str, Any], slide_id: str) -> list[SlideArea] | None:
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
    except (FileNotFoundError, ValueError, KeyError, zarr.errors.GroupNotFoundError):
        return None
    if json.loads(json.dumps(attrs.get("key"))) != json.loads(json.dumps(key)):
        return None
    return [SlideArea(a["name"], slide_id, np.asarray(group[f"{i}/image"]), np.asarray(group[f"{i}/classes"]),
                      np.asarray(group[f"{i}/instances"]), tuple(a["box_mask"]), float(a["mpp"]))
            for i, a in enumerate(attrs["areas"])]


def slide_areas(item: SlideInput, annotations: Path, settings: AreaSettings, cache_dir: Path) -> list[SlideArea]:
    """``item``'s labelled areas: from ``cache_dir/<slide_id>.zarr`` when it matches, else read and cached."""
    path = cache_dir / f"{item.slide_id}.zarr"
    key = _cache_key(item, annotations, settings)
    cached = _read_store(path, key, item.slide_id)
    if cached is not None:
        log.info("%s: %d labelled area(s) from %s", item.slide_id, len(cached), path)
        return cached
    areas = _extract(item, annotations, settings)
    if not areas:
        raise DatasetError(f"{annotations}: no labelled pixel at {settings.model_mpp:g} um/px on {item.slide_id}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_store(path, key, areas)
    pixels = sum(int(a.labelled.sum()) for a in areas)
    log.info("%s: %d labelled area(s), %.2f Mpx labelled, read at %.3g um/px", item.slide_id, len(areas), pixels / 1e6,
             areas[0].mpp)
    return areas


def normalise_areas(areas: list[SlideArea], normaliser: StainNormalizer | None, max_fit_px: int = 4_000_000) -> list[SlideArea]:
    """The areas of one slide stain-normalised with source stains fitted once on all of them."""
    if normaliser is None or not areas:
        return areas
    pixels = np.concatenate([a.image[a.labelled] for a in areas])
    if len(pixels) > max_fit_px:
        pixels = pixels[np.random.default_rng(0).choice(len(pixels), max_fit_px, replace=False)]
    normaliser.fit_source(pixels[:, None, :])
    return [SlideArea(a.name, a.slide_id, normaliser.transform(a.image, use_lut=False), a.classes, a.instances,
                      a.box_mask, a.mpp) for a in areas]
