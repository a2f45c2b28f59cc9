"""GlaS challenge object-level metrics (Sirinukunwattana et al., Med. Image Anal. 2017).

``G_i`` are the ground-truth glands, ``S_j`` the segmented objects (instance maps, 0 =
background, ids need not be contiguous). Rules, following the paper and the challenge's
MATLAB evaluation code (``F1score.m``, ``ObjectDice.m``, ``ObjectHausdorff.m``):

* Object F1: a segmented object ``S_j`` is a true positive when it covers at least 50 % of
  the ground-truth object it overlaps most: ``|S_j ∩ G*| >= 0.5 |G*|`` with ``G*`` the
  ``G_i`` of maximum intersection with ``S_j``. Each ``G_i`` is counted as detected at most
  once (two halves of exactly 50 % each give one TP and one FP). FP = #S - TP,
  FN = #G - TP.
* Partner of an object = the object of the other map with the largest intersection
  (ties -> smallest id, as MATLAB's ``mode``). In object Dice an object without an
  overlapping partner scores 0; in object Hausdorff it is paired with the object of the
  other map at minimum Hausdorff distance.
* Weights: ``w_i = |G_i| / sum_k |G_k|`` and ``w~_j = |S_j| / sum_k |S_k|``; each object
  metric is ``0.5 * (sum_i w_i M(G_i, partner) + sum_j w~_j M(partner, S_j))``.
* Hausdorff between two objects is the classic (maximum) Hausdorff distance between their
  *pixel sets*, as in the challenge code (``knnsearch`` over all object pixels), in pixels.
* Empty maps (challenge code): object Dice is 1 when both are empty, 0 when one is;
  object Hausdorff is 0 when both are empty, ``inf`` when one is.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage as ndi

from gsd_wsi.metrics.instances import Overlaps, best_partner, detection_scores, overlaps

log = logging.getLogger(__name__)


def glas_object_f1(pred_inst: np.ndarray, true_inst: np.ndarray) -> dict:
    """GlaS object-level detection precision, recall and F1 (50 % rule, module docstring)."""
    ov = overlaps(pred_inst, true_inst)
    n_true, n_pred = ov.true_area.size, ov.pred_area.size
    best = best_partner(ov.pair_pred, ov.pair_inter.astype(np.float64), n_pred)
    hit = best[best >= 0]
    covered = ov.pair_inter[hit] >= 0.5 * ov.true_area[ov.pair_true[hit]]
    tp = int(np.unique(ov.pair_true[hit][covered]).size)
    return detection_scores(tp, n_pred - tp, n_true - tp)


def _dice(inter: float, area_a: float, area_b: float) -> float:
    return 2.0 * inter / (area_a + area_b)


def glas_object_dice(pred_inst: np.ndarray, true_inst: np.ndarray) -> float:
    """GlaS object Dice: ``0.5 (sum_i w_i D(G_i, S*(G_i)) + sum_j w~_j D(G*(S_j), S_j))``.

    ``S*(G_i)`` is the segmented object of maximum intersection with ``G_i`` (Dice 0 when
    none intersects), and symmetrically ``G*(S_j)``; weights are areas relative to the
    total object area of each map (module docstring).
    """
    ov = overlaps(pred_inst, true_inst)
    n_true, n_pred = ov.true_area.size, ov.pred_area.size
    if n_true == 0 and n_pred == 0:
        return 1.0
    if n_true == 0 or n_pred == 0:
        return 0.0
    inter = ov.pair_inter.astype(np.float64)
    dice = _dice(inter, ov.true_area[ov.pair_true], ov.pred_area[ov.pair_pred])
    total = 0.0
    sides = ((ov.pair_true, ov.true_area, n_true), (ov.pair_pred, ov.pred_area, n_pred))
    for groups, areas, n in sides:
        best = best_partner(groups, inter, n)
        scores = np.where(best >= 0, dice[np.maximum(best, 0)], 0.0)
        total += float((areas / areas.sum() * scores).sum())
    return 0.5 * total


def hausdorff(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Maximum Hausdorff distance (pixels) between the pixel sets of two non-empty masks."""
    union = mask_a | mask_b
    coords = np.argwhere(union)
    crop = tuple(slice(lo, hi + 1) for lo, hi in zip(coords.min(axis=0), coords.max(axis=0)))
    a, b = mask_a[crop], mask_b[crop]
    d_ab = ndi.distance_transform_edt(~b)[a].max()
    d_ba = ndi.distance_transform_edt(~a)[b].max()
    return float(max(d_ab, d_ba))


def _weighted_hausdorff(
    own: np.ndarray, own_ids: np.ndarray, own_area: np.ndarray,
    other: np.ndarray, other_ids: np.ndarray,
    groups: np.ndarray, partners: np.ndarray, inter: np.ndarray,
) -> float:
    """``sum_k w_k H(O_k, partner(O_k))`` over the objects ``O_k`` of one map."""
    best = best_partner(groups, inter, own_ids.size)
    total = 0.0
    for k, obj_id in enumerate(own_ids):
        obj = own == obj_id
        if best[k] >= 0:
            dist = hausdorff(obj, other == other_ids[partners[best[k]]])
        else:  # no overlapping partner: the nearest object of the other map
            dist = min(hausdorff(obj, other == other_id) for other_id in other_ids)
        total += own_area[k] / own_area.sum() * dist
    return total


def glas_object_hausdorff(pred_inst: np.ndarray, true_inst: np.ndarray) -> float:
    """GlaS object Hausdorff: ``0.5 (sum_i w_i H(G_i, S*(G_i)) + sum_j w~_j H(G*(S_j), S_j))``.

    Partners are the objects of maximum intersection, or, without any intersection, the
    object of minimum Hausdorff distance (as the challenge code does); distances in pixels.
    """
    ov: Overlaps = overlaps(pred_inst, true_inst)
    pred, true = np.asarray(pred_inst), np.asarray(true_inst)
    n_true, n_pred = ov.true_area.size, ov.pred_area.size
    if n_true == 0 and n_pred == 0:
        return 0.0
    if n_true == 0 or n_pred == 0:
        return math.inf
    inter = ov.pair_inter.astype(np.float64)
    h_true = _weighted_hausdorff(
        true, ov.true_ids, ov.true_area, pred, ov.pred_ids, ov.pair_true, ov.pair_pred, inter
    )
    h_pred = _weighted_hausdorff(
        pred, ov.pred_ids, ov.pred_area, true, ov.true_ids, ov.pair_pred, ov.pair_true, inter
    )
    return 0.5 * (h_true + h_pred)
