"""Instances out of a model's probabilities: the post-processing of instance-aware targets.

Leaf module (numpy, scipy, scikit-image; no torch). The target a model learnt
(gsd_wsi/targets.py, model.json ``"target"``) decides how its probabilities become instances:

- ``contour`` (background, interior, boundary): a marker-controlled watershed. Seeds are the
  4-connected components of ``p_interior > seed_threshold``; they grow, on the elevation
  ``1 - p_interior``, into the foreground ``1 - p_background > foreground_threshold``
  (interior + boundary). Boundary pixels between two touching nuclei are where their basins meet.
- ``distance`` (background, foreground, distance in [0, 1], not softmaxed): seeds are the
  components of ``distance > seed_threshold``, grown on ``-distance`` into the foreground.
- ``semantic`` (background, object, ...): the 8-connected components of the foreground.

For every kind, holes of the foreground smaller than ``max_hole_um2`` are filled first, a
foreground component that holds no seed becomes one instance of its own, and instances smaller
than ``min_area_um2`` are removed last. Areas are in square micrometres, converted once at the
images' ``mpp``. :func:`tune_postprocess` chooses the thresholds on validation images, for the
best mean of AJI and PQ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from itertools import product
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential, watershed

from gsd_wsi.errors import ConfigError
from gsd_wsi.metrics import aji, panoptic_quality

log = logging.getLogger(__name__)

KINDS = ("semantic", "contour", "distance")
_FOUR = ndi.generate_binary_structure(2, 1)
_EIGHT = np.ones((3, 3), dtype=bool)
# tune_postprocess's grid: 3 x 3 x 3 = 27 settings for a seeded kind, 3 x 3 = 9 for semantic
SEED_GRID = (0.3, 0.5, 0.7)
FOREGROUND_GRID = (0.3, 0.5, 0.7)
MIN_AREA_GRID_UM2 = (2.0, 8.0, 16.0)  # a lymphocyte nucleus is about 30-40 um^2


@dataclass(frozen=True)
class PostprocessConfig:
    """How probabilities become instances; model.json ``"postprocess"`` (see the module docstring)."""

    kind: Literal["semantic", "contour", "distance"] = "semantic"
    seed_threshold: float = 0.5        # on p_interior (contour) or the distance map (distance)
    foreground_threshold: float = 0.5  # on 1 - p_background
    min_seed_um2: float = 0.5          # smaller seeds are dropped (noise in the interior map)
    min_area_um2: float = 2.0          # smaller instances are removed
    max_hole_um2: float = 2.0          # smaller holes of the foreground are filled

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"postprocess kind={self.kind!r}; expected one of {', '.join(KINDS)}")
        for name in ("seed_threshold", "foreground_threshold"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise ConfigError(f"postprocess {name}={value!r}; expected a probability in [0, 1)")
        for name in ("min_seed_um2", "min_area_um2", "max_hole_um2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"postprocess {name}={value!r}; expected an area >= 0 in um^2")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PostprocessConfig:
        """The config of a model.json record; missing keys take the defaults, unknown keys are refused."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"postprocess record has unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)


def recorded_postprocess(info: dict[str, Any]) -> tuple[str, PostprocessConfig | None]:
    """The model's target kind (model.json ``"target"``; absent = semantic) and its post-processing
    (``"postprocess"``; missing keys = the defaults): for an instance target always, for a
    semantic one when finetune tuned it (else None: connected components)."""
    kind = str((info.get("target") or {}).get("kind", "semantic"))
    if kind == "semantic" and not info.get("postprocess"):
        return kind, None
    record = dict(info.get("postprocess") or {})
    if record.setdefault("kind", kind) != kind:
        raise ConfigError(f"model.json: target kind {kind!r} but postprocess kind {record['kind']!r}; "
                          "re-run finetune or fix model.json")
    return kind, PostprocessConfig.from_dict(record)


def _px(area_um2: float, mpp: float) -> float:
    return area_um2 / (mpp * mpp)


def _check(probabilities: np.ndarray, kind: str, mpp: float) -> np.ndarray:
    probabilities = np.asarray(probabilities)
    need = {"semantic": 2, "contour": 3, "distance": 3}[kind]
    if probabilities.ndim != 3 or probabilities.shape[0] < need or (kind != "semantic" and probabilities.shape[0] != need):
        raise ConfigError(f"{kind} post-processing needs ({need}{'+' if kind == 'semantic' else ''}, H, W) "
                          f"probabilities; got shape {probabilities.shape}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"the resolution must be a positive um/px; got {mpp}")
    return probabilities


def _foreground(probabilities: np.ndarray, threshold: float, max_hole_px: float) -> np.ndarray:
    """``1 - p_background > threshold`` with its holes (not touching the image border) under ``max_hole_px`` filled."""
    mask = (1.0 - probabilities[0]) > threshold
    if max_hole_px <= 0:
        return mask
    holes, n = ndi.label(~mask, structure=_FOUR)
    if n == 0:
        return mask
    area = np.bincount(holes.ravel(), minlength=n + 1)
    small = area < max_hole_px
    small[0] = False
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small[border] = False
    return mask | small[holes]


def _seeds(score: np.ndarray, threshold: float, min_seed_px: float) -> np.ndarray:
    """4-connected components of ``score > threshold`` of at least ``min_seed_px`` pixels (int32)."""
    seeds, n = ndi.label(score > threshold, structure=_FOUR)
    if n and min_seed_px > 0:
        small = np.bincount(seeds.ravel(), minlength=n + 1) < min_seed_px
        small[0] = False
        seeds[small[seeds]] = 0
    return seeds.astype(np.int32)


def _grow(seeds: np.ndarray, elevation: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Instances of ``foreground``: each 8-connected component holding one seed (or none) is one
    instance; a component holding several is split among them by a watershed on ``elevation``.

    The watershed runs on each such component's bounding box, masked to the component, so its
    result depends on the component alone, not on what else the image holds (scikit-image
    breaks ties between markers of equal elevation by their place in one heap shared by the
    whole image). `segment` labels slides in overlapping cores and relies on this: a nucleus
    seen from two cores is labelled the same in both (gsd_wsi/instance_bands.py).
    """
    components, n = ndi.label(foreground, structure=_EIGHT)
    labels = components.astype(np.int32)
    if n == 0:
        return labels
    seeds = np.where(foreground, seeds, 0)
    marked = seeds > 0
    pairs = np.unique(np.stack([components[marked], seeds[marked]]), axis=1) if marked.any() else np.zeros((2, 0), int)
    seeds_per_component = np.bincount(pairs[0], minlength=n + 1)
    next_id = n + 1
    boxes = ndi.find_objects(components)
    for c in np.flatnonzero(seeds_per_component > 1):
        box = boxes[c - 1]
        mask = components[box] == c
        split = watershed(elevation[box], np.where(mask, seeds[box], 0), mask=mask)
        _, inverse = np.unique(split[mask], return_inverse=True)
        region = labels[box]
        region[mask] = next_id + inverse.reshape(-1)
        next_id += int(inverse.max()) + 1
    return labels


def _drop_small(labels: np.ndarray, min_area_px: float) -> np.ndarray:
    """Zero the instances under ``min_area_px`` pixels (ids kept)."""
    if min_area_px > 0 and labels.any():
        small = np.bincount(labels.ravel()) < min_area_px
        small[0] = False
        labels = np.where(small[labels], 0, labels)
    return labels


def _seed_inputs(probabilities: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(seed score, watershed elevation) of a seeded kind."""
    if kind == "contour":
        return probabilities[1], 1.0 - probabilities[1]
    return probabilities[2], -probabilities[2]


def instances_from_probabilities(probabilities: np.ndarray, config: PostprocessConfig, mpp: float) -> np.ndarray:
    """Instance labels (int32 HxW, 0 background, 1..n) from (C, H, W) probabilities at ``mpp`` um/px.

    ``config.kind`` says what the channels are (module docstring): ``contour`` (C = 3,
    softmax over background, interior, boundary), ``distance`` (C = 3: background and
    foreground softmaxed, then a distance map in [0, 1]) or ``semantic`` (C >= 2, softmax).
    """
    probabilities = _check(probabilities, config.kind, mpp)
    foreground = _foreground(probabilities, config.foreground_threshold, _px(config.max_hole_um2, mpp))
    if config.kind == "semantic":
        labels = ndi.label(foreground, structure=_EIGHT)[0]
    else:
        score, elevation = _seed_inputs(probabilities, config.kind)
        seeds = _seeds(score, config.seed_threshold, _px(config.min_seed_um2, mpp))
        labels = _grow(seeds, elevation, foreground)
    labels = _drop_small(labels, _px(config.min_area_um2, mpp))
    return relabel_sequential(labels.astype(np.int32))[0].astype(np.int32)


def tune_postprocess(examples: Sequence[tuple[np.ndarray, np.ndarray]], kind: str,
                     mpp: float) -> tuple[PostprocessConfig, dict[str, float]]:
    """The post-processing of the grid (SEED_GRID x FOREGROUND_GRID x MIN_AREA_GRID_UM2) of best
    mean (AJI + PQ) / 2, and its mean ``{"aji", "pq"}`` over the images (NaN when none defines them).

    Both metrics are scored because each misses what the other sees: AJI weighs errors by area,
    so specks cost it almost nothing, while PQ counts every false nucleus once.

    ``examples`` are ``(probabilities (C, H, W), true instances (H, W))`` pairs at ``mpp`` um/px,
    and must be VALIDATION images only: thresholds tuned on the test images would flatter the
    scores `evaluate` reports on them. Seeds and foregrounds are computed once per threshold and
    the watershed once per (seed, foreground) pair; the area rule is applied to its result. Ties
    go to the first setting in grid order; images where AJI is undefined (nothing on either
    side) are skipped, and without any defined AJI the defaults are returned.
    """
    if kind not in KINDS:
        raise ConfigError(f"postprocess kind={kind!r}; expected one of {', '.join(KINDS)}")
    if mpp is None or not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"tune_postprocess needs the images' resolution (a positive um/px) for its areas in um^2; "
                          f"got {mpp}")
    base = PostprocessConfig(kind=kind)  # type: ignore[arg-type]
    seeds_grid = SEED_GRID if kind != "semantic" else (base.seed_threshold,)
    settings = list(product(seeds_grid, FOREGROUND_GRID, MIN_AREA_GRID_UM2))
    scores = np.full((len(examples), len(settings), 2), np.nan)  # (AJI, PQ) per image and setting
    for i, (probabilities, truth) in enumerate(examples):
        probabilities = _check(probabilities, kind, mpp)
        foregrounds = {t: _foreground(probabilities, t, _px(base.max_hole_um2, mpp)) for t in FOREGROUND_GRID}
        if kind != "semantic":
            score, elevation = _seed_inputs(probabilities, kind)
            seeds = {t: _seeds(score, t, _px(base.min_seed_um2, mpp)) for t in seeds_grid}
        grown: dict[tuple[float, float], np.ndarray] = {}
        for j, (seed_t, fg_t, min_area) in enumerate(settings):
            if (seed_t, fg_t) not in grown:
                grown[seed_t, fg_t] = (ndi.label(foregrounds[fg_t], structure=_EIGHT)[0] if kind == "semantic"
                                       else _grow(seeds[seed_t], elevation, foregrounds[fg_t]))
            labels = _drop_small(grown[seed_t, fg_t], _px(min_area, mpp))
            scores[i, j] = aji(labels, truth), panoptic_quality(labels, truth)["pq"]
    defined = ~np.isnan(scores).any(axis=2)
    if not defined.any():
        log.info("no validation image with objects: the default post-processing is kept")
        return base, {"aji": math.nan, "pq": math.nan}
    # undefined scores are the same images in every column (no objects on either side), so the means compare
    mean = np.where(defined[..., None], scores, 0.0).sum(axis=0) / defined.sum(axis=0).clip(min=1)[:, None]
    best = int(np.argmax(mean.mean(axis=1)))
    seed_t, fg_t, min_area = settings[best]
    tuned = replace(base, seed_threshold=seed_t, foreground_threshold=fg_t, min_area_um2=min_area)
    found = {"aji": float(mean[best, 0]), "pq": float(mean[best, 1])}
    log.info("post-processing tuned on %d validation image(s): %s, mean AJI %.4f, PQ %.4f", len(examples), tuned,
             found["aji"], found["pq"])
    return tuned, found
