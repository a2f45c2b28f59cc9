"""The band stitcher: exact reconstruction, the sum of weights, bounded rows, order checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers.utils import compute_importance_map

from gsd_wsi.errors import ConfigError
from gsd_wsi.stitch import BandStitcher, stride_for_overlap, window_starts, window_weights


def smooth_field(width: int, height: int) -> np.ndarray:
    """A stand-in model's output: two smooth channels of canvas position."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    a = 0.5 + 0.4 * np.sin(x / 37.0) * np.cos(y / 23.0)
    return np.stack([a, 1.0 - a]).astype(np.float32)


def stitch_all(field: np.ndarray, window_px: int, overlap: float, band_px: int, kind: str = "gaussian"):
    _, height, width = field.shape
    stride = stride_for_overlap(window_px, overlap)
    out = np.full_like(field, np.nan)
    weight = np.full(field.shape[1:], np.nan, np.float32)
    bands: list[tuple[int, int]] = []

    def sink(y0: int, blended: np.ndarray, w: np.ndarray) -> None:
        bands.append((y0, blended.shape[1]))
        out[:, y0:y0 + blended.shape[1]] = blended
        weight[y0:y0 + w.shape[0]] = w

    stitcher = BandStitcher(width, height, field.shape[0], window_px, sink, band_px=band_px, weights=kind)
    for y in window_starts(height, window_px, stride):
        for x in window_starts(width, window_px, stride):
            stitcher.add(field[:, y:y + window_px, x:x + window_px], (x, y))
    stitcher.finish()
    return out, weight, bands


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["gaussian", "ramp"])
def test_smooth_function_is_reconstructed_exactly(overlap: float, kind: str) -> None:
    # 333 x 517: neither side a multiple of the stride, so the last windows are moved back
    field = smooth_field(517, 333)
    out, weight, bands = stitch_all(field, 64, overlap, band_px=48, kind=kind)
    assert np.all(weight > 0)
    np.testing.assert_allclose(out, field, rtol=0, atol=1e-6)
    assert [b[0] for b in bands] == list(range(0, 333, 48))
    assert sum(b[1] for b in bands) == 333


def test_canvas_smaller_than_a_window() -> None:
    field = smooth_field(40, 30)
    out, _, _ = stitch_all(field, 64, 0.25, band_px=512)
    np.testing.assert_allclose(out, field, atol=1e-6)


def test_divides_by_the_sum_of_weights_not_the_count() -> None:
    # two overlapping windows with constant values 1 and 3: where both reach, the result is
    # the weighted mean (w1 * 1 + w2 * 3) / (w1 + w2), not (w1 * 1 + w2 * 3) / 2
    got = {}
    stitcher = BandStitcher(96, 64, 1, 64, lambda y0, b, w: got.update(b=b.copy(), w=w.copy()), band_px=64)
    stitcher.add(np.ones((1, 64, 64), np.float32), (0, 0))
    stitcher.add(np.full((1, 64, 64), 3.0, np.float32), (32, 0))
    stitcher.finish()
    weights = window_weights(64)
    w1, w2 = weights[:, 32:], weights[:, :32]
    np.testing.assert_allclose(got["b"][0, :, 32:64], (w1 + 3 * w2) / (w1 + w2), rtol=1e-6)
    np.testing.assert_allclose(got["b"][0, :, :32], 1.0)
    np.testing.assert_allclose(got["b"][0, :, 64:], 3.0)


def test_uncovered_pixels_have_zero_weight_and_value() -> None:
    got = []
    stitcher = BandStitcher(200, 100, 2, 32, lambda y0, b, w: got.append((b.copy(), w.copy())), band_px=100)
    stitcher.add(np.ones((2, 32, 32), np.float32), (10, 10))
    stitcher.finish()
    blended, weight = got[0]
    assert weight[50:, :].max() == 0 and blended[:, 50:, :].max() == 0
    assert np.all(weight[10:42, 10:42] > 0)


def test_gaussian_matches_monai_importance_map() -> None:
    ours = window_weights(64, "gaussian")
    theirs = compute_importance_map((64, 64), mode="gaussian", sigma_scale=0.125, device=torch.device("cpu")).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_window_starts_as_monai() -> None:
    from monai.data.utils import dense_patch_slices

    for size, window, stride in [(517, 64, 48), (256, 256, 192), (1000, 256, 192), (300, 256, 1)]:
        theirs = sorted({s[0].start for s in dense_patch_slices((size,), (window,), (stride,))})
        assert window_starts(size, window, stride).tolist() == theirs


def test_buffer_does_not_grow_with_height() -> None:
    sizes = []
    for height in (512, 8192):
        stitcher = BandStitcher(1024, height, 3, 256, lambda *a: None, band_px=512)
        sizes.append(stitcher.buffer_bytes)
    assert sizes[0] == sizes[1] == 4 * 4 * (512 + 256) * 1024


def test_windows_out_of_row_order_are_refused() -> None:
    stitcher = BandStitcher(64, 512, 1, 32, lambda *a: None, band_px=64)
    stitcher.add(np.ones((1, 32, 32), np.float32), (0, 200))
    with pytest.raises(ConfigError, match="top to bottom"):
        stitcher.add(np.ones((1, 32, 32), np.float32), (0, 10))
    with pytest.raises(ConfigError, match="shape"):
        stitcher.add(np.ones((2, 32, 32), np.float32), (0, 300))
