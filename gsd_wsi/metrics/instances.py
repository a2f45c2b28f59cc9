"""Instance metrics for nuclei (MoNuSeg): instance labelling, AJI, PQ and object F1.

Instance maps hold 0 for background and any non-negative ids (not necessarily
contiguous). Every metric starts from :func:`overlaps`, a sparse table of pairwise
intersections built from one joint histogram of ``(true_id, pred_id)`` over pixels, so the
cost is O(pixels log pixels), not O(objects x pixels).

Empty cases: AJI, PQ/DQ/SQ and F1 are NaN when both maps are empty (nothing to score);
with objects on one side only they are 0 (precision or recall alone may be 0/0 = NaN).
SQ is 0 when there is no true positive.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from skimage import segmentation

from gsd_wsi.metrics.semantic import MetricInputError, check_label_maps

log = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), dtype=bool)


class Overlaps(NamedTuple):
    """Sparse pairwise overlap table of two instance maps (object indices are 0-based)."""

    true_ids: np.ndarray  # (n_true,) original ids, sorted
    pred_ids: np.ndarray  # (n_pred,)
    true_area: np.ndarray  # (n_true,) pixels
    pred_area: np.ndarray  # (n_pred,)
    pair_true: np.ndarray  # (n_pairs,) index into true_ids
    pair_pred: np.ndarray  # (n_pairs,) index into pred_ids
    pair_inter: np.ndarray  # (n_pairs,) intersection in pixels (> 0)

    @property
    def pair_iou(self) -> np.ndarray:
        union = self.true_area[self.pair_true] + self.pred_area[self.pair_pred] - self.pair_inter
        return self.pair_inter / union


def overlaps(pred_inst: np.ndarray, true_inst: np.ndarray) -> Overlaps:
    """Intersections of every overlapping (true, pred) object pair, from a joint histogram."""
    pred, true = check_label_maps(pred_inst, true_inst)
    true_ids, true_idx = _unique_inverse(true.ravel())
    pred_ids, pred_idx = _unique_inverse(pred.ravel())
    # Shift so that background (when present) is -1 and objects are 0-based.
    t_off = 1 if true_ids.size and true_ids[0] == 0 else 0
    p_off = 1 if pred_ids.size and pred_ids[0] == 0 else 0
    true_idx, pred_idx = true_idx.ravel() - t_off, pred_idx.ravel() - p_off
    n_true, n_pred = true_ids.size - t_off, pred_ids.size - p_off
    true_area = np.bincount(true_idx[true_idx >= 0], minlength=n_true)
    pred_area = np.bincount(pred_idx[pred_idx >= 0], minlength=n_pred)
    both = (true_idx >= 0) & (pred_idx >= 0)
    key = true_idx[both].astype(np.int64) * max(n_pred, 1) + pred_idx[both]
    if n_true * max(n_pred, 1) <= max(key.size, 1 << 16):  # a dense table is no larger than the pixels
        counts = np.bincount(key, minlength=n_true * max(n_pred, 1))
        keys = np.flatnonzero(counts)
        inter = counts[keys]
    else:
        keys, inter = np.unique(key, return_counts=True)
    return Overlaps(
        true_ids[t_off:], pred_ids[p_off:], true_area, pred_area,
        keys // max(n_pred, 1), keys % max(n_pred, 1), inter,
    )


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, by a lookup table (O(pixels)) when the ids are
    non-negative and not much larger than the number of pixels (label maps), else by sorting."""
    if values.size and np.issubdtype(values.dtype, np.integer):
        low, high = int(values.min()), int(values.max())
        if low >= 0 and high <= 4 * values.size:
            present = np.bincount(values, minlength=high + 1) > 0
            ids = np.flatnonzero(present).astype(values.dtype)
            lookup = np.cumsum(present) - 1
            return ids, lookup[values]
    return np.unique(values, return_inverse=True)


def best_partner(groups: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Index of the pair with the largest ``values`` within each group (-1 when none).

    Ties go to the first pair in table order, i.e. the smallest partner id (as MATLAB's
    ``max``/``mode``).
    """
    best = np.full(n_groups, -1, dtype=np.int64)
    if groups.size == 0:
        return best
    order = np.lexsort((np.arange(groups.size), -values, groups))
    first = np.ones(order.size, dtype=bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    best[groups[order][first]] = order[first]
    return best


def _remove_small(labels: np.ndarray, min_size_px: int) -> np.ndarray:
    """Zero the objects of fewer than ``min_size_px`` pixels (any skimage version)."""
    area = np.bincount(labels.ravel())
    small = area < min_size_px
    small[0] = False
    return np.where(small[labels], 0, labels)


def label_instances(binary: np.ndarray, min_size_px: int = 10) -> np.ndarray:
    """Instances (int32, 0 = background) from a binary nucleus mask.

    Connected components with 8-connectivity; components smaller than ``min_size_px`` pixels
    are removed. Touching nuclei stay merged: an instance-aware target splits them
    (gsd_wsi/instances.py).
    """
    mask = np.asarray(binary).astype(bool)
    labels, _ = ndi.label(mask, structure=_EIGHT)
    labels = _remove_small(labels, min_size_px)
    return segmentation.relabel_sequential(labels)[0].astype(np.int32)


def aji(pred_inst: np.ndarray, true_inst: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017, MoNuSeg).

    For each true object ``G_i``, ``S_j`` = the predicted object of maximum IoU with it
    (a predicted object may serve several ``G_i``): ``C += |G_i ∩ S_j|``,
    ``U += |G_i ∪ S_j|``; a ``G_i`` overlapping no prediction adds ``|G_i|`` to ``U``.
    Predicted objects never chosen add their area to ``U``. AJI = C / U (NaN if U = 0).
    """
    ov = overlaps(pred_inst, true_inst)
    best = best_partner(ov.pair_true, ov.pair_iou, ov.true_area.size)
    matched = best[best >= 0]
    inter = ov.pair_inter[matched]
    c_sum = inter.sum()
    areas = ov.true_area[ov.pair_true[matched]] + ov.pred_area[ov.pair_pred[matched]]
    u_sum = (areas - inter).sum()
    u_sum += ov.true_area[best < 0].sum()
    used = np.zeros(ov.pred_area.size, dtype=bool)
    used[ov.pair_pred[matched]] = True
    u_sum += ov.pred_area[~used].sum()
    return float(c_sum / u_sum) if u_sum > 0 else math.nan


def match_instances(
    ov: Overlaps, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (true, pred) matches with IoU > ``iou_threshold``: (true_idx, pred_idx, iou).

    For thresholds >= 0.5 the matching is unique by construction (Kirillov et al. 2019);
    below 0.5 a maximum-IoU assignment (Hungarian) is used, as MONAI does.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise MetricInputError(f"iou_threshold must be in (0, 1], got {iou_threshold}.")
    iou = ov.pair_iou
    if iou_threshold >= 0.5:
        keep = iou > iou_threshold
        return ov.pair_true[keep], ov.pair_pred[keep], iou[keep]
    n_true, n_pred = ov.true_area.size, ov.pred_area.size
    if n_true == 0 or n_pred == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    table = np.zeros((n_true, n_pred))
    table[ov.pair_true, ov.pair_pred] = iou
    rows, cols = linear_sum_assignment(-table)
    keep = table[rows, cols] > iou_threshold
    return rows[keep], cols[keep], table[rows[keep], cols[keep]]


def panoptic_quality(
    pred_inst: np.ndarray, true_inst: np.ndarray, iou_threshold: float = 0.5
) -> dict:
    """Panoptic quality (Kirillov et al., CVPR 2019) of one instance class.

    DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of matched pairs, PQ = DQ x SQ, with the
    unique matching of :func:`match_instances`. Returns pq, dq, sq, tp, fp, fn.
    """
    ov = overlaps(pred_inst, true_inst)
    _, _, iou = match_instances(ov, iou_threshold)
    tp = int(iou.size)
    fp, fn = int(ov.pred_area.size - tp), int(ov.true_area.size - tp)
    den = tp + 0.5 * fp + 0.5 * fn
    dq = tp / den if den > 0 else math.nan
    sq = float(iou.sum() / tp) if tp else (0.0 if den > 0 else math.nan)
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def object_f1(pred_inst: np.ndarray, true_inst: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Detection precision, recall and F1 with the matching of :func:`panoptic_quality`.

    F1 = 2TP / (2TP + FP + FN), which equals DQ. Returns precision, recall, f1, tp, fp, fn.
    """
    pq = panoptic_quality(pred_inst, true_inst, iou_threshold)
    return detection_scores(pq["tp"], pq["fp"], pq["fn"])


def detection_scores(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 from counts (0/0 -> NaN)."""
    return {
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }
