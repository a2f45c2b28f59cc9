"""Metrics: hand-computed toy cases (closed forms in the comments) and MONAI cross-checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi

from gsd_wsi.metrics import (
    MetricInputError,
    aji,
    confusion,
    glas_object_dice,
    glas_object_f1,
    glas_object_hausdorff,
    hd95,
    label_instances,
    object_f1,
    panoptic_quality,
    semantic_scores,
)
from gsd_wsi.metrics.instances import overlaps

torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")


def _one_hot(labels: np.ndarray, n_classes: int) -> "torch.Tensor":
    return torch.from_numpy(np.eye(n_classes, dtype=np.float32)[labels].transpose(2, 0, 1)[None])


def _blobs(rng: np.random.Generator, shape=(64, 64), sigma=4.0, q=0.6) -> np.ndarray:
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, q)


# --- semantic -----------------------------------------------------------------------------


def test_two_class_by_hand():
    true = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 1]])
    # class 1: TP 3, FP 1 (0,1), FN 1 (1,2); class 0 mirrors it.
    np.testing.assert_array_equal(confusion(pred, true, 2), [[3, 1], [1, 3]])
    scores = semantic_scores(pred, true, 2)
    for c in (0, 1):
        s = scores["per_class"][c]
        assert s["dice"] == pytest.approx(6 / 8)
        assert s["iou"] == pytest.approx(3 / 5)
        assert s["precision"] == pytest.approx(3 / 4)
        assert s["recall"] == pytest.approx(3 / 4)
        assert s["hd95_um"] is None
    assert scores["foreground_mean"]["dice"] == pytest.approx(0.75)


def test_three_class_by_hand_with_absent_class():
    true = np.array([[0, 1, 1, 2, 2, 2]])
    pred = np.array([[0, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(
        confusion(pred, true, 4), [[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    )
    scores = semantic_scores(pred, true, 4, mpp=0.5)
    c1, c2, c3 = scores["per_class"][1:]
    # class 1: TP 1, FP 0, FN 1; class 2: TP 2, FP 1, FN 1
    def four(s):
        return s["dice"], s["iou"], s["precision"], s["recall"]

    assert four(c1) == pytest.approx((2 / 3, 1 / 2, 1, 1 / 2))
    assert four(c2) == pytest.approx((2 / 3, 1 / 2, 2 / 3, 2 / 3))
    # class 3 is in neither map: NaN, excluded from the foreground mean (not 0, not 1)
    assert all(math.isnan(c3[k]) for k in ("dice", "iou", "precision", "recall", "hd95_px"))
    assert not c3["hd95_one_side_empty"]
    fg = scores["foreground_mean"]
    assert fg["dice"] == pytest.approx(2 / 3)
    assert fg["precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert fg["recall"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert fg["hd95_um"] == pytest.approx(fg["hd95_px"] * 0.5)


def test_class_on_one_side_only_scores_zero_and_flags_hd95():
    true = np.array([[0, 1, 1, 0]])
    pred = np.array([[0, 1, 1, 2]])
    s = semantic_scores(pred, true, 3)["per_class"][2]
    assert s["dice"] == 0 and s["iou"] == 0 and s["precision"] == 0
    assert math.isnan(s["recall"])  # 0/0: no true pixels of class 2
    assert math.isnan(s["hd95_px"]) and s["hd95_one_side_empty"]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="label 3"):
        confusion(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(MetricInputError, match="same shape"):
        confusion(np.zeros(3, int), np.zeros(4, int), 2)


def test_dice_iou_match_monai():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, (32, 32))
    pred = np.where(rng.random((32, 32)) < 0.7, true, rng.integers(0, 3, (32, 32)))
    scores = semantic_scores(pred, true, 3)["per_class"]
    y_pred, y = _one_hot(pred, 3), _one_hot(true, 3)
    dice = monai_metrics.compute_dice(y_pred, y, include_background=True)[0].numpy()
    iou = monai_metrics.compute_iou(y_pred, y, include_background=True)[0].numpy()
    np.testing.assert_allclose([s["dice"] for s in scores], dice, rtol=1e-6)
    np.testing.assert_allclose([s["iou"] for s in scores], iou, rtol=1e-6)


# --- HD95 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6])
def test_hd95_of_offset_squares_is_the_offset(k):
    # Every boundary distance is <= k and over 5 % of them (the far sides) equal k.
    a = np.zeros((60, 60), bool)
    a[10:30, 10:30] = True
    b = np.roll(a, k, axis=1)
    assert hd95(a, b) == pytest.approx(k)
    assert hd95(a, b, spacing=0.25) == pytest.approx(0.25 * k)


def test_hd95_of_two_points_and_empty_masks():
    a = np.zeros((12, 12), bool)
    b = a.copy()
    a[5, 5], b[8, 9] = True, True  # a 3-4-5 triangle
    assert hd95(a, b) == pytest.approx(5.0)
    assert math.isnan(hd95(a, np.zeros_like(a)))
    assert math.isnan(hd95(np.zeros_like(a), np.zeros_like(a)))


@pytest.mark.parametrize("seed,spacing", [(1, 1.0), (2, 1.0), (3, 0.25), (4, 2.0)])
def test_hd95_matches_monai_on_random_blobs(seed, spacing):
    rng = np.random.default_rng(seed)
    pred, true = _blobs(rng), _blobs(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = monai_metrics.compute_hausdorff_distance(
            _one_hot(pred.astype(int), 2), _one_hot(true.astype(int), 2),
            percentile=95, spacing=spacing,
        )
    # Same boundaries, distances and percentile rule; MONAI works in float32 (KD-tree
    # distances cast to float32, torch.quantile in float32), we in float64: observed
    # differences are <= 7e-7 relative.
    assert hd95(pred, true, spacing=spacing) == pytest.approx(float(ref[0, 0]), rel=1e-6)


# --- nuclei instances ---------------------------------------------------------------------


def _split_merge_case() -> tuple[np.ndarray, np.ndarray]:
    """GT: A 4x10 (40 px), B and C 4x5 side by side (20 px each), D 2x4 (8 px, missed).
    Pred: A split into P1 4x6 (24) + P2 4x4 (16); B+C merged into P3 4x10 (40);
    P4 2x2 (4 px) false positive. Ids are deliberately non-contiguous."""
    true = np.zeros((14, 10), np.int32)
    true[0:4, :] = 5  # A
    true[6:10, 0:5] = 7  # B
    true[6:10, 5:10] = 9  # C
    true[12:14, 6:10] = 20  # D
    pred = np.zeros((14, 10), np.int32)
    pred[0:4, 0:6] = 3  # P1
    pred[0:4, 6:10] = 11  # P2
    pred[6:10, :] = 4  # P3
    pred[12:14, 0:2] = 8  # P4
    return pred, true


def test_aji_split_and_merge_by_hand():
    pred, true = _split_merge_case()
    # A -> P1 (IoU 24/40 beats 16/40): C += 24, U += 40
    # B -> P3 (IoU 20/40): C += 20, U += 40;  C -> P3 too: C += 20, U += 40
    # D has no overlap: U += 8;  unused P2, P4: U += 16 + 4
    assert aji(pred, true) == pytest.approx(64 / 148)
    assert aji(true, true) == 1.0
    assert aji(np.zeros_like(true), true) == 0.0
    assert math.isnan(aji(np.zeros_like(true), np.zeros_like(true)))


def test_pq_and_object_f1_by_hand_and_against_monai():
    pred, true = _split_merge_case()
    # Only A-P1 has IoU > 0.5 (0.6); B-P3 and C-P3 sit at exactly 0.5 (not > 0.5).
    pq = panoptic_quality(pred, true)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 3, 3)
    assert pq["sq"] == pytest.approx(0.6)
    assert pq["dq"] == pytest.approx(1 / (1 + 1.5 + 1.5))
    assert pq["pq"] == pytest.approx(0.15)
    f1 = object_f1(pred, true)
    assert (f1["precision"], f1["recall"], f1["f1"]) == pytest.approx((0.25, 0.25, 0.25))
    ref = monai_metrics.compute_panoptic_quality(
        torch.from_numpy(pred), torch.from_numpy(true), output_confusion_matrix=True
    ).numpy()
    np.testing.assert_allclose(ref, [1, 3, 3, 0.6], rtol=1e-6)
    perfect = panoptic_quality(true, true)
    assert perfect["pq"] == 1.0 and perfect["fp"] == 0 and perfect["fn"] == 0


def _random_discs(rng: np.random.Generator, shape, n, r_lo=6, r_hi=12) -> np.ndarray:
    """Instance map of ``n`` random discs (later discs overwrite earlier ones)."""
    inst = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        r = int(rng.integers(r_lo, r_hi))
        cy, cx = (int(rng.integers(r, s - r)) for s in shape)
        yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
        window = inst[cy - r : cy + r + 1, cx - r : cx + r + 1]
        window[yy**2 + xx**2 <= r * r] = i
    return inst


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_pq_matches_monai_on_random_discs(threshold):
    rng = np.random.default_rng(5)
    true = _random_discs(rng, (128, 128), 30)
    pred = np.roll(_random_discs(np.random.default_rng(5), (128, 128), 30), 3, axis=0)
    pred[rng.random(pred.shape) < 0.02] = 0
    ours = panoptic_quality(pred, true, iou_threshold=threshold)
    ref = monai_metrics.compute_panoptic_quality(
        torch.from_numpy(pred), torch.from_numpy(true),
        match_iou_threshold=threshold, output_confusion_matrix=True,
    ).numpy()
    assert (ours["tp"], ours["fp"], ours["fn"]) == tuple(int(v) for v in ref[:3])
    assert ours["sq"] * ours["tp"] == pytest.approx(float(ref[3]), rel=1e-5)


def test_label_instances_merges_touching_discs_and_drops_specks():
    yy, xx = np.mgrid[:60, :80]
    binary = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 100) | ((yy - 30) ** 2 + (xx - 47) ** 2 <= 100)
    binary[2:4, 2:4] = True  # 4-pixel speck, below min_size_px
    joined = label_instances(binary, min_size_px=10)
    assert joined.dtype == np.int32 and joined.max() == 1 and joined[2, 2] == 0
    assert label_instances(binary, min_size_px=1)[2, 2] > 0


def test_overlaps_lookup_path_matches_sorting():
    """The O(pixels) lookup of small ids gives the table np.unique gives on sparse, huge ids."""
    rng = np.random.default_rng(3)
    true = _random_discs(rng, (200, 200), 30)
    pred = np.roll(true, 3, axis=0)
    sparse = lambda labels: np.where(labels > 0, labels.astype(np.int64) * 10**9 + 7, 0)  # noqa: E731
    small, huge = overlaps(pred, true), overlaps(sparse(pred), sparse(true))
    for name in ("true_area", "pred_area", "pair_true", "pair_pred", "pair_inter"):
        assert np.array_equal(getattr(small, name), getattr(huge, name)), name
    assert aji(pred, true) == aji(sparse(pred), sparse(true))


def test_instance_metrics_on_a_large_map():
    rng = np.random.default_rng(7)
    true = _random_discs(rng, (1000, 1000), 400)
    pred = np.roll(true, 2, axis=1)
    a, pq = aji(pred, true), panoptic_quality(pred, true)
    assert 0.5 < a < 1 and pq["tp"] > 300


# --- GlaS glands --------------------------------------------------------------------------


def test_glas_object_f1_fifty_percent_rule():
    true = np.zeros((30, 40), np.int32)
    true[0:10, 0:10] = 1  # G1, 100 px
    true[0:5, 20:30] = 2  # G2, 50 px
    true[20:25, 0:10] = 3  # G3, 50 px
    pred = np.zeros_like(true)
    pred[0:10, 0:8] = 1  # covers 80 % of G1: TP
    pred[0:5, 20:25] = 2  # covers exactly 50 % of G2: TP (at least 50 %)
    pred[20:25, 0:4] = 3  # covers 40 % of G3: FP
    pred[28:30, 38:40] = 4  # touches nothing: FP
    f1 = glas_object_f1(pred, true)
    assert (f1["tp"], f1["fp"], f1["fn"]) == (2, 2, 1)
    assert f1["f1"] == pytest.approx(4 / 7)
    pred[0:5, 25:30] = 5  # the other half of G2: G2 is detected once, the half is an FP
    f1 = glas_object_f1(pred, true)
    assert (f1["tp"], f1["fp"], f1["fn"]) == (2, 3, 1)


def test_glas_object_dice_with_missed_gland():
    true = np.zeros((12, 32), np.int32)
    true[0:10, 0:10] = 1  # G1, 100 px
    true[0:5, 20:30] = 2  # G2, 50 px, missed
    pred = np.zeros_like(true)
    pred[0:10, 0:8] = 1  # S1, 80 px inside G1: Dice(G1, S1) = 160/180 = 8/9
    # GT side: 100/150 * 8/9 + 50/150 * 0 = 16/27; S side: 1 * 8/9 = 24/27
    assert glas_object_dice(pred, true) == pytest.approx(0.5 * (16 / 27 + 24 / 27))
    assert glas_object_dice(true, true) == 1.0
    assert glas_object_dice(np.zeros_like(true), true) == 0.0


def test_glas_object_hausdorff_by_hand():
    true = np.zeros((32, 32), np.int32)
    true[0:10, 0:10] = 1  # G1, 100 px
    true[0:5, 20:30] = 2  # G2, 50 px, overlaps no segmented object
    pred = np.zeros_like(true)
    pred[0:10, 0:8] = 1  # S1 inside G1: H(G1, S1) = 2 (column 9 to column 7)
    # G2 -> nearest object S1: H = 22 ((0,29) to (0,7)); S1's far point (9,0) is only
    # sqrt(5^2 + 20^2) from G2. GT side 100/150 * 2 + 50/150 * 22 = 26/3; S side 2.
    assert glas_object_hausdorff(pred, true) == pytest.approx(0.5 * (26 / 3 + 2))
    pred[30:32, 28:30] = 2  # S2, 4 px, overlaps nothing
    # G2's nearest object stays S1 (H(G2, S2) = sqrt(30^2 + 8^2) > 22). S2's nearest GT is
    # G2 (H = sqrt(964), from (0,20) to (30,28)), not G1 (sqrt(30^2 + 28^2)).
    s_side = (80 * 2 + 4 * math.sqrt(964)) / 84
    assert glas_object_hausdorff(pred, true) == pytest.approx(0.5 * (26 / 3 + s_side))
    assert glas_object_hausdorff(true, true) == 0.0
    assert glas_object_hausdorff(np.zeros_like(true), true) == math.inf
