"""Annotated slides as the items of `finetune` and `evaluate`: their labelled areas, resolution, classes, splits.

Each labelled area of a slide (gsd_wsi/stages/labelled_slides.py) is one item, named by its
ROI's own name in QuPath, else ``<slide_id>#<k>``; a split file may list area names or slide
ids (a slide id stands for all its areas). Without a split file, validation holds out whole
slides when there are two or more (``val_fraction`` of them), else areas of the one slide.

The model's resolution is ``--train-mpp``, else the slides' own (the median of their level-0
resolutions, which must agree within 5 %). Every area is read at that resolution, so the
items need no resampling. A slide that cannot be read or whose annotations are missing or
wrong is a problem of the run (logged, in config.json), never a stop, unless no slide is left.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gsd_wsi.datasets import DatasetError, split_by_image, split_from_file
from gsd_wsi.datasets.slide_labels import IGNORE_CLASS, ROI_CLASS
from gsd_wsi.errors import ConfigError, GsdWsiError
from gsd_wsi.manifest import SLIDE_SUFFIXES, SlideInput, collect_inputs
from gsd_wsi.slide import open_slide
from gsd_wsi.stages.labelled_slides import AreaSettings, SlideArea, annotation_path, read_class_names, slide_areas
from gsd_wsi.train.finetune_config import DATA_MPP_SPREAD

log = logging.getLogger(__name__)

BACKGROUND = "background"


@dataclass(frozen=True)
class AreaItem:
    """One labelled area as a training or evaluation item (``name`` is the split unit)."""

    name: str
    slide_id: str
    area: SlideArea


@dataclass(frozen=True)
class SlideData:
    """What the annotated slides give a run."""

    items: list[AreaItem]
    problems: list[str]
    model_mpp: float
    class_names: tuple[str, ...]
    record: dict[str, Any]          # config.json's "data": the slides, their annotations, the ROI classes


def is_slide_input(sources: Sequence[str | Path], annotations: Path | None) -> bool:
    """Slides with annotations rather than a folder of labelled images: ``--annotations`` given, several
    sources, a CSV manifest, or a slide file."""
    if annotations is not None or len(sources) != 1:
        return True
    path = Path(sources[0])
    return path.is_file() and (path.suffix.lower() == ".csv" or path.suffix.lower() in SLIDE_SUFFIXES)


def _model_mpp(inputs: list[SlideInput], train_mpp: float | None, problems: list[str]) -> tuple[list[SlideInput], float]:
    """The slides that open, and the model's resolution: ``train_mpp``, else theirs (within 5 %)."""
    usable, mpps = [], {}
    for item in inputs:
        try:
            with open_slide(item.path, mpp=item.mpp) as slide:
                mpps[item.slide_id] = slide.mpp
            usable.append(item)
        except GsdWsiError as exc:
            problems.append(f"{item.slide_id}: {exc}")
    if not usable:
        raise DatasetError(f"no slide could be read: {'; '.join(problems[:3])}")
    if train_mpp is not None:
        return usable, train_mpp
    low, high = min(mpps.values()), max(mpps.values())
    if high / low - 1 > DATA_MPP_SPREAD:
        raise ConfigError(f"the slides are at {low:g} to {high:g} um/px; give the model's resolution with --train-mpp "
                          f"(at least {high:g})")
    return usable, float(np.median(list(mpps.values())))


def slides_mpp(sources: Sequence[str | Path]) -> float | None:
    """The median level-0 resolution of the slides of ``sources`` that open (None if none does):
    which member of a built-in model family serves them."""
    mpps = []
    for item in collect_inputs(list(sources)):
        if item.error is None:
            try:
                with open_slide(item.path, mpp=item.mpp) as slide:
                    mpps.append(slide.mpp)
            except GsdWsiError:
                continue  # reported with the slide's areas
    return float(np.median(mpps)) if mpps else None


def load_slide_data(sources: Sequence[str | Path], annotations: Path | None, cache_dir: Path, *,
                    model_mpp: float | None = None, class_names: Sequence[str] | None = None,
                    model_classes: bool = False, min_px: int = 256, roi_class: str = ROI_CLASS,
                    ignore_class: str = IGNORE_CLASS) -> SlideData:
    """The labelled areas of ``sources`` (slide files, folders, CSV manifests) at ``model_mpp`` (None:
    the slides' own), ``class_names`` background first (None: from the annotations, sorted).

    ``model_classes``: ``class_names`` are a trained model's, matched to the annotations' spelling
    (:func:`matched_classes`), as `evaluate` needs.
    """
    problems: list[str] = []
    inputs: list[SlideInput] = []
    for item in collect_inputs(list(sources)):
        if item.error:
            problems.append(item.error)
            continue
        try:
            inputs.append(dataclasses.replace(item, annotations=annotation_path(item, annotations)))
        except DatasetError as exc:
            problems.append(str(exc))
            log.error("%s", exc)
    if not inputs:
        raise DatasetError(f"no annotated slide to learn from: {'; '.join(problems[:3])}")
    inputs, mpp = _model_mpp(inputs, model_mpp, problems)
    found = read_class_names([_annotations(i) for i in inputs], roi_class, ignore_class)
    if class_names is not None and model_classes:  # a trained model's: the annotations' spelling of them
        class_names = matched_classes(class_names, found)
    elif class_names is None:
        class_names = (BACKGROUND, *(found or ["object"]))
        log.info("classes from the annotations: %s", ", ".join(class_names))
    settings = AreaSettings(mpp, tuple(class_names), roi_class, ignore_class, min_px)
    items: list[AreaItem] = []
    for item in inputs:
        try:
            items += [AreaItem(a.name, a.slide_id, a) for a in slide_areas(item, _annotations(item), settings, cache_dir)]
        except GsdWsiError as exc:
            problems.append(f"{item.slide_id}: {exc}")
            log.error("%s: %s", item.slide_id, exc)
    if not items:
        raise DatasetError(f"no labelled area on any slide: {'; '.join(problems[:3])}")
    names = [i.name for i in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetError(f"area name(s) {', '.join(repeated)} on more than one slide; names are what splits use, "
                           "so rename the regions of interest in QuPath")
    record = {"slides": {i.slide_id: {"path": str(i.path), "annotations": str(i.annotations)} for i in inputs},
              "roi_class": roi_class, "ignore_class": ignore_class, "model_mpp": mpp, "areas": len(items)}
    return SlideData(items, problems, mpp, tuple(class_names), record)


def matched_classes(model_names: Sequence[str], found: Sequence[str]) -> tuple[str, ...]:
    """A model's classes as the annotations spell them: the same name in another case, or, for a
    model of one object class (``nucleus``) and annotations of one (``Nucleus``, ``Nuclei``), that
    one (logged). Names that match nothing stay, so that an unknown class is refused with the list."""
    names = list(model_names)
    by_lower = {n.lower(): i for i, n in enumerate(names)}
    for name in found:
        i = by_lower.get(name.lower())
        if i is not None and names[i] != name:
            names[i] = name
    if len(names) == 2 and len(found) == 1 and found[0] != names[1]:
        log.info("annotation class %r scored as the model's %r", found[0], names[1])
        names[1] = found[0]
    return tuple(names)


def _annotations(item: SlideInput) -> Path:
    if item.annotations is None:
        raise DatasetError(f"{item.slide_id}: no annotations")
    return item.annotations


def slide_splits(items: list[AreaItem], listed: dict[str, list[str]], val_fraction: float,
                 seed: int) -> dict[str, list[AreaItem]]:
    """``{"train", "val", "test"}`` of the areas: a split file's lists (area names or slide ids), else
    whole slides held out for validation when there are two or more, else areas of the one slide."""
    by_slide: dict[str, list[str]] = {}
    for item in items:
        by_slide.setdefault(item.slide_id, []).append(item.name)
    known = {i.name for i in items}
    if any(listed.get(k) for k in ("train", "val", "test")):
        expanded = {k: [n for name in v for n in (by_slide[name] if name in by_slide and name not in known else [name])]
                    for k, v in listed.items()}
        return split_from_file(items, expanded, val_fraction, seed)  # type: ignore[arg-type]
    if len(by_slide) >= 2 and val_fraction > 0:
        slides = [AreaItem(slide_id, slide_id, items[0].area) for slide_id in sorted(by_slide)]
        held = split_by_image(slides, val_fraction, (), seed)  # type: ignore[arg-type]
        val_slides = {s.name for s in held["val"]}
        return {"train": [i for i in items if i.slide_id not in val_slides],
                "val": [i for i in items if i.slide_id in val_slides], "test": []}
    if val_fraction > 0:
        log.warning("one slide: its validation areas lie beside the training ones (tissue of one slide is "
                    "correlated); annotate a second slide for an honest validation")
    return split_by_image(items, val_fraction, (), seed)  # type: ignore[arg-type]
