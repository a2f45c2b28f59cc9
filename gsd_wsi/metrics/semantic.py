"""Semantic (per-class) scores on label maps: confusion, Dice, IoU, precision, recall, HD95.

Every score is computed per class ``c`` (background 0 included) on the binary masks
``pred == c`` and ``true == c``, and averaged over the foreground classes ``1..C-1``.

Conventions (chosen so that a class that is simply not there cannot inflate or sink a mean):

* A class absent from both ``pred`` and ``true``: Dice, IoU, precision and recall are NaN and
  are left out of the foreground mean (``np.nanmean``); they are neither 1 nor 0.
* A class present on one side only: Dice = IoU = 0; precision is 0 when predicted but not
  true, recall is 0 when true but not predicted, and the other of the two is NaN (0/0).
* HD95 with one side empty is NaN and the class is flagged (``hd95_one_side_empty``); with
  both empty it is NaN as well. NaN HD95 values are left out of the foreground mean.

HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95)``: boundaries are the mask
minus its erosion by the 4-connected cross (``scipy.ndimage.binary_erosion``, pixels on the
image border count as boundary); each boundary pixel of one mask gets its Euclidean
distance (physical, via ``spacing``) to the nearest boundary pixel of the other; the 95th
percentile (linear interpolation) of each directed set is taken and the result is the
*maximum of the two directed percentiles* (not the percentile of the pooled set).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage as ndi

from gsd_wsi.errors import MetricInputError

log = logging.getLogger(__name__)

SCORE_NAMES = ("dice", "iou", "precision", "recall", "hd95_px", "hd95_um")


def check_label_maps(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``pred``, ``true`` as integer arrays after checking shapes and signs."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise MetricInputError(
            f"pred and true must have the same shape, got {pred.shape} and {true.shape}."
        )
    for name, arr in (("pred", pred), ("true", true)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise MetricInputError(f"{name} must hold integer labels, got dtype {arr.dtype}.")
        if arr.size and arr.min() < 0:
            raise MetricInputError(f"{name} holds a negative label {int(arr.min())}.")
    return pred.astype(np.int64, copy=False), true.astype(np.int64, copy=False)


def confusion(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix ``m[t, p]`` = number of pixels of true class ``t`` predicted ``p``.

    Raises :class:`MetricInputError` (a ``ValueError``) when shapes differ or a label is
    ``>= n_classes``; the message names the bad label.
    """
    if n_classes < 1:
        raise MetricInputError(f"n_classes must be >= 1, got {n_classes}.")
    pred, true = check_label_maps(pred, true)
    for name, arr in (("pred", pred), ("true", true)):
        if arr.size and arr.max() >= n_classes:
            raise MetricInputError(
                f"{name} holds label {int(arr.max())} but n_classes={n_classes}; "
                f"labels must be in 0..{n_classes - 1}."
            )
    key = true.ravel() * n_classes + pred.ravel()
    counts = np.bincount(key, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask minus its erosion by the 4-connected cross (MONAI ``get_mask_edges``)."""
    return mask & ~ndi.binary_erosion(mask)


def _directed_distances(src: np.ndarray, dst: np.ndarray, spacing: float) -> np.ndarray:
    """Distance from each ``True`` pixel of ``src`` to the nearest ``True`` pixel of ``dst``."""
    dist = ndi.distance_transform_edt(~dst, sampling=(spacing,) * dst.ndim)
    return dist[src]


def hd95(pred_mask: np.ndarray, true_mask: np.ndarray, spacing: float = 1.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the boundaries of two masks.

    ``max(P95(d(∂pred -> ∂true)), P95(d(∂true -> ∂pred)))`` with the boundary, distance
    and percentile conventions of MONAI's ``compute_hausdorff_distance(percentile=95)``
    (see the module docstring); distances are in the unit of ``spacing`` (pixels by
    default). Returns NaN when either mask is empty.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    true_mask = np.asarray(true_mask, dtype=bool)
    if pred_mask.shape != true_mask.shape:
        raise MetricInputError(
            f"masks must have the same shape, got {pred_mask.shape} and {true_mask.shape}."
        )
    if spacing <= 0:
        raise MetricInputError(f"spacing must be > 0, got {spacing}.")
    if not pred_mask.any() or not true_mask.any():
        return math.nan
    # Crop to the union's bounding box plus a 1-pixel margin: exact, since every boundary
    # pixel lies inside it, and the margin keeps erosion at the crop edge unchanged.
    coords = np.argwhere(pred_mask | true_mask)
    lo = np.maximum(coords.min(axis=0) - 1, 0)
    hi = coords.max(axis=0) + 2
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    edge_p, edge_t = _boundary(pred_mask[crop]), _boundary(true_mask[crop])
    d_pt = _directed_distances(edge_p, edge_t, spacing)
    d_tp = _directed_distances(edge_t, edge_p, spacing)
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else math.nan


def semantic_scores(
    pred: np.ndarray, true: np.ndarray, n_classes: int, mpp: float | None = None
) -> dict:
    """Per-class and foreground-mean Dice, IoU, precision, recall and HD95.

    Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN), precision = TP / (TP + FP),
    recall = TP / (TP + FN), all from :func:`confusion`; HD95 from :func:`hd95` in pixels
    and, when ``mpp`` (micrometres per pixel) is given, in micrometres (else None).
    NaN conventions are those of the module docstring.

    Returns ``{"per_class": [dict per class 0..C-1], "foreground_mean": dict}``; each
    per-class dict also holds ``"hd95_one_side_empty"`` (bool).
    """
    if mpp is not None and mpp <= 0:
        raise MetricInputError(f"mpp must be > 0 or None, got {mpp}.")
    cm = confusion(pred, true, n_classes).astype(np.float64)
    pred, true = np.asarray(pred), np.asarray(true)
    per_class = []
    for c in range(n_classes):
        tp = cm[c, c]
        fp = cm[:, c].sum() - tp
        fn = cm[c, :].sum() - tp
        n_pred, n_true = tp + fp, tp + fn
        scores: dict = {
            "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": _ratio(tp, tp + fp + fn),
            "precision": _ratio(tp, n_pred),
            "recall": _ratio(tp, n_true),
        }
        one_side_empty = (n_pred > 0) != (n_true > 0)
        hd_px = math.nan if (n_pred == 0 or n_true == 0) else hd95(pred == c, true == c)
        scores["hd95_px"] = hd_px
        scores["hd95_um"] = None if mpp is None else hd_px * mpp
        scores["hd95_one_side_empty"] = bool(one_side_empty)
        if one_side_empty:
            log.debug("class %d is empty on one side; HD95 is NaN", c)
        per_class.append(scores)
    return {"per_class": per_class, "foreground_mean": _foreground_mean(per_class, mpp)}


def _foreground_mean(per_class: list[dict], mpp: float | None) -> dict:
    """NaN-skipping mean of each score over classes 1..C-1 (NaN when none is defined)."""
    means: dict = {}
    for name in SCORE_NAMES:
        if name == "hd95_um" and mpp is None:
            means[name] = None
            continue
        values = np.array([s[name] for s in per_class[1:]], dtype=np.float64)
        finite = values[~np.isnan(values)]
        means[name] = float(finite.mean()) if finite.size else math.nan
    return means
