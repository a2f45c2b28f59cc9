"""Blending overlapping window predictions into one canvas, in row bands, in bounded memory.

Every window's values are multiplied by a smooth weight (Gaussian, as MONAI's
``compute_importance_map``, or a linear ramp) and accumulated with the weights themselves;
each output pixel is the weighted sum divided by the **sum of the weights** that reached it.
Peers get this wrong in two ways: uniform weights (seams where windows meet: TIAToolbox,
MONAI's on-disk mergers) or Gaussian weights divided by the number of windows (LazySlide:
edges fade). Where the stand-in values are the same in every window, the result is exactly
those values, whatever the overlap (the tests check it).

Windows arrive in rows, top to bottom (their top edges never decrease by more than the
band already flushed). The stitcher holds only ``band_px + window_px`` rows of the canvas;
when a window starts below the current band, the band is final and handed to ``sink``:

    stitcher = BandStitcher(width_px, height_px, n_channels=2, window_px=256, sink=write)
    for values, mask_xy in windows_in_rows:      # values (C, h, w), mask_xy its top-left
        stitcher.add(values, mask_xy)
    stitcher.finish()                            # flushes the remaining bands

``sink(y0, blended, weight)`` receives canvas rows ``y0 .. y0 + rows``: ``blended`` (C, rows,
width) float32, the weighted mean where ``weight > 0`` and 0 elsewhere, and ``weight``
(rows, width) float32, the sum of weights (0 where no window reached). Both are views of
the stitcher's buffer, valid until the sink returns (copy what you keep). Peak memory is
``(C + 1) * (band_px + window_px) * width * 4`` bytes: it depends on the canvas width and
the window, not on the canvas area.

Positions are pixels of the canvas (``mask_xy``): in `gsd-wsi segment` the canvas is level 0
of the mask, whose pixel (x, y) covers slide level-0 pixels (x*d, y*d) to ((x+1)*d, (y+1)*d).
Numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from gsd_wsi.errors import ConfigError

Sink = Callable[[int, np.ndarray, np.ndarray], None]
WeightKind = Literal["gaussian", "ramp", "constant"]

#: MONAI's default: sigma = 0.125 x the window side.
GAUSSIAN_SIGMA_SCALE = 0.125
#: Smallest weight anywhere in a window (MONAI clamps at 1e-3 too), so a pixel covered by
#: one window's corner only still gets that window's value rather than 0/0.
MIN_WEIGHT = 1e-3


def window_weights(window_px: int, kind: WeightKind = "gaussian") -> np.ndarray:
    """(window_px, window_px) float32 weights, highest at the centre, never below ``MIN_WEIGHT``.

    ``gaussian``: separable, sigma = 0.125 x window, exactly MONAI's ``compute_importance_map``;
    ``ramp``: a pyramid falling linearly from the centre to ``MIN_WEIGHT`` at the border;
    ``constant``: all ones (uniform averaging, for comparison).
    """
    if window_px < 1:
        raise ConfigError(f"window size must be positive (got {window_px})")
    offsets = np.arange(window_px, dtype=np.float64) - (window_px - 1) / 2.0
    if kind == "gaussian":
        sigma = GAUSSIAN_SIGMA_SCALE * window_px
        profile = np.exp(-(offsets**2) / (2.0 * sigma**2))
    elif kind == "ramp":
        half = max((window_px - 1) / 2.0, 1.0)
        profile = 1.0 - np.abs(offsets) / (half + 1.0)
    elif kind == "constant":
        profile = np.ones(window_px)
    else:
        raise ConfigError(f"unknown window weighting {kind!r}; choose gaussian, ramp or constant")
    weights = np.outer(profile, profile)
    return np.maximum(weights, MIN_WEIGHT).astype(np.float32)


def window_starts(size_px: int, window_px: int, stride_px: int) -> np.ndarray:
    """Window starts along one axis covering ``0 .. size_px``: every ``stride_px``, the last one
    moved back to end at the edge (MONAI's ``dense_patch_slices``); one window at 0 when the
    axis is shorter than a window."""
    if stride_px < 1:
        raise ConfigError(f"window stride must be at least 1 px (got {stride_px})")
    if size_px <= window_px:
        return np.zeros(1, np.int64)
    n = -(-(size_px - window_px) // stride_px) + 1
    starts = np.arange(n, dtype=np.int64) * stride_px
    return np.minimum(starts, size_px - window_px)


def stride_for_overlap(window_px: int, overlap: float) -> int:
    """Stride between windows overlapping by ``overlap`` of their side (as MONAI rounds it)."""
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"--overlap is a fraction of the window in [0, 1) (got {overlap})")
    return max(1, int(window_px * (1.0 - overlap)))


class BandStitcher:
    """Weighted blending of windows into row bands handed to ``sink`` (see the module docstring)."""

    def __init__(self, width_px: int, height_px: int, n_channels: int, window_px: int, sink: Sink,
                 band_px: int = 512, weights: WeightKind | np.ndarray = "gaussian") -> None:
        if width_px < 1 or height_px < 1:
            raise ConfigError(f"canvas must be at least 1x1 px (got {width_px}x{height_px})")
        if n_channels < 1 or band_px < 1:
            raise ConfigError(f"need at least one channel and a positive band (got {n_channels}, {band_px})")
        self.width_px, self.height_px, self.n_channels = width_px, height_px, n_channels
        self.window_px, self.band_px, self.sink = window_px, band_px, sink
        self.weights = window_weights(window_px, weights) if isinstance(weights, str) else np.asarray(weights, np.float32)
        if self.weights.shape != (window_px, window_px):
            raise ConfigError(f"weights of shape {self.weights.shape} for a {window_px}-px window")
        rows = band_px + window_px
        self._acc = np.zeros((n_channels, rows, width_px), np.float32)
        self._wsum = np.zeros((rows, width_px), np.float32)
        self._y0 = 0            # canvas row of buffer row 0; rows above it are flushed
        self._finished = False

    @property
    def flushed_rows(self) -> int:
        """Canvas rows already handed to the sink."""
        return self._y0

    @property
    def buffer_bytes(self) -> int:
        return self._acc.nbytes + self._wsum.nbytes

    def add(self, values: np.ndarray, mask_xy: tuple[int, int]) -> None:
        """Blend one window: ``values`` (C, h, w) with h, w <= the window, top-left ``mask_xy``.

        Parts outside the canvas are ignored. A window smaller than ``window_px`` (an image
        smaller than one window) uses the top-left part of the weights.
        """
        if self._finished:
            raise RuntimeError("add() after finish()")
        x, y = int(mask_xy[0]), int(mask_xy[1])
        c, h, w = values.shape
        if c != self.n_channels or h > self.window_px or w > self.window_px:
            raise ConfigError(f"window values of shape {values.shape}; expected ({self.n_channels}, <= {self.window_px}, "
                              f"<= {self.window_px})")
        if y < self._y0:
            raise ConfigError(f"window at y={y} arrived after rows up to {self._y0} were flushed; add windows in rows, "
                              f"top to bottom")
        while y >= self._y0 + self.band_px:
            self._flush_band()
        x0, y0, x1, y1 = max(x, 0), y, min(x + w, self.width_px), min(y + h, self.height_px)
        if x1 <= x0 or y1 <= y0:
            return
        weights = self.weights[y0 - y: y1 - y, x0 - x: x1 - x]
        rows = slice(y0 - self._y0, y1 - self._y0)
        self._acc[:, rows, x0:x1] += values[:, y0 - y: y1 - y, x0 - x: x1 - x] * weights
        self._wsum[rows, x0:x1] += weights

    def add_batch(self, values: np.ndarray, mask_xy: np.ndarray) -> None:
        """``add`` for each of N windows: values (N, C, h, w), mask_xy (N, 2)."""
        for window, xy in zip(values, mask_xy):
            self.add(window, (int(xy[0]), int(xy[1])))

    def finish(self) -> None:
        """Flush every remaining row to the sink."""
        if self._finished:
            return
        while self._y0 < self.height_px:
            self._flush_band()
        self._finished = True

    def _flush_band(self) -> None:
        rows = min(self.band_px, self.height_px - self._y0)
        if rows <= 0:
            self._y0 += self.band_px
            return
        # Divided in place: these buffer rows are final and overwritten by the shift below
        # (its source rows lie past the band), so the sink gets views, not copies.
        weight = self._wsum[:rows]
        blended = self._acc[:, :rows]
        np.divide(blended, weight, out=blended, where=weight[None] > 0)
        self.sink(self._y0, blended, weight)
        keep = self._acc.shape[1] - self.band_px  # rows already touched by windows below the band
        self._acc[:, :keep] = self._acc[:, self.band_px:]
        self._acc[:, keep:] = 0.0
        self._wsum[:keep] = self._wsum[self.band_px:]
        self._wsum[keep:] = 0.0
        self._y0 += self.band_px
