"""Instance-aware training targets from instance label maps (`finetune --target`).

Leaf module (numpy, scipy; no torch). Semantic fine-tuning (background / object) lets
touching nuclei merge into one connected component; these targets keep them apart:

- :func:`contour_target`: three classes, 0 background, 1 object interior, 2 object boundary.
  A pixel of an instance is boundary when it lies within ``boundary_px`` of a pixel that is
  not of its instance (background or another instance). Two touching instances are thus
  separated by boundary pixels on both sides, and the interiors of two instances are never
  8-adjacent (``boundary_px >= 1``), so the interior's connected components are the instances.
  An instance thinner than the band keeps its innermost pixels as interior, so that every
  instance at least 2 px thick leaves a seed for a marker-controlled watershed.
- :func:`distance_target`: per instance, the distance of each pixel to the nearest pixel not of
  its instance, divided by the instance's largest such distance: 1 at its centre, small at its
  edge, 0 on background.

The image border is not an edge: an instance cut by it continues beyond the image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from gsd_wsi.errors import ConfigError

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
#: The label of pixels that carry none (outside every region of interest of annotated slides):
#: targets keep it, crops carry it, and the losses and scores leave those pixels out.
IGNORE = -1


def boundary_px_at(boundary_um: float, mpp: float) -> float:
    """The boundary band in pixels at ``mpp`` um/px (at least 1 px, the thinnest band that separates)."""
    if not (math.isfinite(boundary_um) and boundary_um > 0):
        raise ConfigError(f"--boundary-um must be a positive width in micrometres; got {boundary_um}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"the resolution must be a positive um/px; got {mpp}")
    return max(1.0, boundary_um / mpp)


def _instance_distances(instances: np.ndarray):
    """Yield ``(slice, own mask, distance)`` per instance: distance to the nearest pixel not of it."""
    if instances.ndim != 2 or not np.issubdtype(instances.dtype, np.integer):
        raise ConfigError(f"instance labels must be a 2-D integer map; got shape {instances.shape}, {instances.dtype}")
    height, width = instances.shape
    for index, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None:
            continue
        y0, y1 = max(box[0].start - 1, 0), min(box[0].stop + 1, height)
        x0, x1 = max(box[1].start - 1, 0), min(box[1].stop + 1, width)
        own = instances[y0:y1, x0:x1] == index
        # one pixel more on every side: a copy of the edge at the image border (not an edge there),
        # the neighbouring pixel inside the image
        padded = np.pad(own, 1, mode="edge")
        distance = ndi.distance_transform_edt(padded)[1:-1, 1:-1]
        yield (slice(y0, y1), slice(x0, x1)), own, distance


def contour_target(instances: np.ndarray, boundary_px: float) -> np.ndarray:
    """uint8 map of the same shape: 0 background, 1 interior, 2 boundary (see the module docstring)."""
    if not (math.isfinite(boundary_px) and boundary_px >= 1):
        raise ConfigError(f"boundary_px must be at least 1 (the thinnest band that separates); got {boundary_px}")
    target = np.zeros(instances.shape, np.uint8)
    for box, own, distance in _instance_distances(instances):
        deepest = float(distance[own].max())
        # the band, narrowed for a thin instance so that its innermost pixels stay interior
        band = max(1.0, min(boundary_px, deepest - 1e-6))
        view = target[box]
        view[own] = np.where(distance[own] <= band, BOUNDARY, INTERIOR)
    return target


#: A distance label's levels: uint8 value v > 0 is an object pixel at distance (v - 1) / 254.
DISTANCE_LEVELS = 254


def distance_label(instances: np.ndarray) -> np.ndarray:
    """The distance target as one uint8 map that crops and geometric augmentation carry like a
    class mask (nearest neighbour): 0 background, ``1 + round(254 d)`` on objects, d from
    :func:`distance_target`. Decoded by the loss (gsd_wsi/nn/losses.DistanceTargetLoss)."""
    distance = distance_target(instances)
    label = np.zeros(instances.shape, np.uint8)
    own = instances > 0
    label[own] = 1 + np.rint(distance[own] * DISTANCE_LEVELS).astype(np.uint8)
    return label


def distance_target(instances: np.ndarray) -> np.ndarray:
    """float32 map in [0, 1]: per instance, distance to its edge over the instance's largest (0 on background)."""
    target = np.zeros(instances.shape, np.float32)
    for box, own, distance in _instance_distances(instances):
        view = target[box]
        view[own] = distance[own] / distance[own].max()
    return target


def with_ignored(target: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """``target`` (any integer map) as int16 with :data:`IGNORE` where ``ignored``; unchanged
    (no copy) when nothing is ignored, so labelled images train exactly as before."""
    if not ignored.any():
        return target
    out = target.astype(np.int16)
    out[ignored] = IGNORE
    return out


def background_where(probabilities: np.ndarray, ignored: np.ndarray | None) -> np.ndarray:
    """(C, H, W) probabilities (or a distance model's channels) with every ``ignored`` pixel certain
    background: class 0 at 1, every other channel at 0, so no object is predicted there."""
    if ignored is None:
        return probabilities
    out = probabilities.copy()
    out[:, ignored] = 0.0
    out[0, ignored] = 1.0
    return out


def pixel_probabilities(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """The probabilities of the classes pixels are scored on: a contour model's object is interior +
    boundary, a distance model's are its background and foreground channels; a semantic model's
    are its classes as they are."""
    if kind == "contour":
        return object_probabilities(probabilities)
    if kind == "distance":
        return probabilities[:2]
    return probabilities


def object_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """(3, H, W) contour probabilities -> (2, H, W) background / object: the object is interior + boundary."""
    if probabilities.ndim != 3 or probabilities.shape[0] != 3:
        raise ConfigError(f"contour probabilities must be (3, H, W); got {probabilities.shape}")
    return np.stack([probabilities[BACKGROUND], probabilities[INTERIOR] + probabilities[BOUNDARY]])
