"""The `Slide` interface every reader backend implements.

Coordinates: ``l0_xy`` are level-0 pixels (x, y); ``level_xy`` are pixels of one pyramid
level. Pixels come back as uint8 RGB arrays of shape (height, width, 3); areas outside the
slide read as white, as glass does.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from gsd_wsi.imageops import resize_rgb

logger = logging.getLogger(__name__)

#: Relative difference under which a level's resolution counts as the target resolution,
#: so that e.g. a 0.499 um/px scan is tiled at "0.5 um/px" without a needless resample.
MPP_SNAP_TOLERANCE = 0.02

#: Rows of the source level read at once when making a thumbnail, so memory stays bounded
#: even on slides without a pyramid.
_THUMB_BAND_PX = 2048


@dataclass(frozen=True)
class SlideLevel:
    """One pyramid level: its size in its own pixels and its downsample from level 0."""

    index: int
    width_px: int
    height_px: int
    downsample: float


class Slide(ABC):
    """An open whole-slide image. Use as a context manager, or call :meth:`close`."""

    #: Short name of the reader backend ("tifffile", "openslide", "image", "tiatoolbox").
    backend: str = ""

    def __init__(self, path: Path, levels: tuple[SlideLevel, ...], mpp: float) -> None:
        self.path = Path(path)
        self.levels = levels
        self.mpp = float(mpp)

    # -- properties ---------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.levels[0].width_px, self.levels[0].height_px

    @property
    def bounds_l0_xy(self) -> tuple[int, int]:
        """Top-left of the scanned area in level-0 pixels (OpenSlide's ``openslide.bounds-x/-y``;
        (0, 0) for formats without bounds). Viewers such as QuPath crop the slide to its bounds,
        so coordinates written for them are relative to this corner."""
        return 0, 0

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.levels[level].downsample

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose resolution is at least as fine as ``target_mpp``.

        Reading there and resizing once is the cheapest way to reach the target without
        upsampling. Level 0 when even it is coarser than the target (the caller decides
        whether that upsampling is acceptable).
        """
        best = 0
        for level in self.levels:
            if self.level_mpp(level.index) <= target_mpp * (1.0 + MPP_SNAP_TOLERANCE):
                if level.downsample > self.levels[best].downsample:
                    best = level.index
        return best

    # -- pixels ---------------------------------------------------------------------------
    @abstractmethod
    def read_level_region(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        """Read ``size_px`` = (width, height) pixels of ``level`` whose top-left is ``level_xy``.

        The array may be read-only (a backend may hand out a cached tile): copy it to modify it.
        """

    def read_region(self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """OpenSlide-style read: top-left in level-0 pixels, size in pixels of ``level``.

        The level-0 position is mapped to the level's pixel lattice by rounding, so a
        position that is not on that lattice is snapped to it (no sub-pixel resampling).
        """
        ds = self.levels[level].downsample
        level_xy = (int(round(l0_xy[0] / ds)), int(round(l0_xy[1] / ds)))
        return self.read_level_region(level, level_xy, size_px)

    def thumbnail(self, target_mpp: float) -> tuple[np.ndarray, tuple[float, float]]:
        """A whole-slide image at about ``target_mpp``, read in bands from the best level.

        Returns the RGB thumbnail and its exact scale as level-0 pixels per thumbnail pixel
        along (x, y), which differs slightly from ``target_mpp / mpp`` after rounding.
        """
        level = self.best_level_for_mpp(target_mpp)
        lv = self.levels[level]
        scale = target_mpp / self.level_mpp(level)  # level pixels per thumbnail pixel
        thumb_w = max(1, int(round(lv.width_px / scale)))
        thumb_h = max(1, int(round(lv.height_px / scale)))
        if thumb_w == lv.width_px and thumb_h == lv.height_px:
            thumb = self.read_level_region(level, (0, 0), (lv.width_px, lv.height_px))
        else:
            thumb = self._banded_resize(level, (thumb_w, thumb_h))
        l0_w, l0_h = self.dimensions
        return thumb, (l0_w / thumb_w, l0_h / thumb_h)

    def _banded_resize(self, level: int, thumb_size: tuple[int, int]) -> np.ndarray:
        """Resize a whole level to ``thumb_size`` reading bands, so memory stays bounded.

        One thread reads band k+1 while this one resizes band k (decoders and Pillow's
        resize release the GIL): two bands in memory, and only one thread reads the slide.
        """
        lv = self.levels[level]
        thumb_w, thumb_h = thumb_size
        rows_per_thumb_row = lv.height_px / thumb_h
        # Each band covers a whole number of thumbnail rows, so bands resize independently.
        band_thumb_rows = max(1, int(_THUMB_BAND_PX // max(rows_per_thumb_row, 1.0)))
        bands = []
        for t0 in range(0, thumb_h, band_thumb_rows):
            t1 = min(thumb_h, t0 + band_thumb_rows)
            y0 = int(math.floor(t0 * rows_per_thumb_row))
            y1 = min(lv.height_px, int(math.ceil(t1 * rows_per_thumb_row)))
            bands.append((t0, t1, y0, max(1, y1 - y0)))

        def read(band_index: int) -> np.ndarray:
            _, _, y0, rows = bands[band_index]
            return self.read_level_region(level, (0, y0), (lv.width_px, rows))

        out = np.empty((thumb_h, thumb_w, 3), np.uint8)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gsd-wsi-thumbnail") as reader:
            next_band = reader.submit(read, 0)
            for k, (t0, t1, _, _) in enumerate(bands):
                band = next_band.result()
                if k + 1 < len(bands):
                    next_band = reader.submit(read, k + 1)
                out[t0:t1] = resize_rgb(band, (thumb_w, t1 - t0))
                del band
        return out

    def limit_cache(self, max_bytes: int) -> None:
        """Bound the memory a backend spends on decoded tiles (no-op for backends without a cache)."""

    def file_tile_px(self, level: int) -> tuple[int, int] | None:
        """(width, height) of the file's own tiles at ``level``, where the backend knows them."""
        return None

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Release file handles. Safe to call twice."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"{type(self).__name__}({str(self.path)!r}, {w}x{h} px, {self.mpp:g} um/px, {len(self.levels)} levels)"


def paste_into_canvas(
    source: np.ndarray, source_xy: tuple[int, int], region_xy: tuple[int, int], canvas: np.ndarray
) -> None:
    """Copy the overlap of ``source`` (top-left at ``source_xy``) into ``canvas`` (top-left at
    ``region_xy``), both positions in one pixel frame. Parts outside either are ignored."""
    sx, sy = source_xy
    rx, ry = region_xy
    h, w = canvas.shape[:2]
    x0, y0 = max(sx, rx), max(sy, ry)
    x1, y1 = min(sx + source.shape[1], rx + w), min(sy + source.shape[0], ry + h)
    if x1 <= x0 or y1 <= y0:
        return
    canvas[y0 - ry : y1 - ry, x0 - rx : x1 - rx] = source[y0 - sy : y1 - sy, x0 - sx : x1 - sx]
