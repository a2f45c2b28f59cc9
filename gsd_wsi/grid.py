"""The tile grid: where tiles lie at a target resolution, and how much tissue each holds.

Frames: the grid is laid on the pixel lattice of the pyramid level it is read from
(``read_xy``), so every read is pixel-aligned; positions are reported in level-0 pixels
(``l0_xy``) as everywhere else. Tissue fractions are exact area integrals of the tissue
mask over each tile's footprint, fractional mask pixels included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gsd_wsi.errors import ConfigError, SlideTooSmallError
from gsd_wsi.slide.base import MPP_SNAP_TOLERANCE, Slide

#: Refuse to upsample more than this: a tile at 0.25 um/px made from a 0.5 um/px scan
#: invents detail the scanner never saw.
MAX_UPSAMPLE = 1.0 + MPP_SNAP_TOLERANCE


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``tile_px`` pixels at ``tile_mpp``, read as ``read_px`` squares of ``level``."""

    level: int
    level_downsample: float
    read_px: int          # tile side in pixels of the level read (resized once to tile_px)
    read_stride_px: int   # stride in pixels of the level read
    tile_px: int
    stride_px: int
    tile_mpp: float       # the resolution tiles really have (the target, or the level's when snapped)
    l0_xy: np.ndarray     # (N, 2) int64, top-left of each tile in level-0 pixels
    read_xy: np.ndarray   # (N, 2) int64, top-left of each tile in pixels of ``level``

    @property
    def n_tiles(self) -> int:
        return int(self.l0_xy.shape[0])

    @property
    def tile_l0_px(self) -> float:
        """Side of a tile's footprint in level-0 pixels."""
        return self.read_px * self.level_downsample

    def subset(self, keep: np.ndarray) -> TileGrid:
        """The same grid with only the tiles where ``keep`` is true."""
        return TileGrid(
            self.level, self.level_downsample, self.read_px, self.read_stride_px, self.tile_px,
            self.stride_px, self.tile_mpp, self.l0_xy[keep], self.read_xy[keep],
        )


def make_grid(slide: Slide, tile_mpp: float, tile_px: int, stride_px: int) -> TileGrid:
    """Every whole tile that fits inside the slide, in row-major order.

    The level read is the coarsest one at least as fine as ``tile_mpp``. Within 2 % of the
    target, a level's own resolution is used as is (no resample; ``tile_mpp`` records it).
    """
    if tile_px <= 0 or stride_px <= 0:
        raise ConfigError(f"tile size and stride must be positive (got tile {tile_px}, stride {stride_px})")
    if tile_mpp <= 0:
        raise ConfigError(f"target resolution must be positive (got {tile_mpp} um/px)")
    if slide.mpp > tile_mpp * MAX_UPSAMPLE:
        raise ConfigError(
            f"{slide.path.name}: the slide's resolution is {slide.mpp:g} um/px, coarser than the target "
            f"{tile_mpp:g} um/px; tiles would be upsampled {slide.mpp / tile_mpp:.2f}x. Use --mpp {slide.mpp:g} or larger"
        )
    level = slide.best_level_for_mpp(tile_mpp)
    level_mpp = slide.level_mpp(level)
    scale = level_mpp / tile_mpp  # tile pixels per level pixel
    if abs(scale - 1.0) <= MPP_SNAP_TOLERANCE:
        scale, effective_mpp = 1.0, level_mpp
    else:
        effective_mpp = tile_mpp
    read_px = int(round(tile_px / scale))
    read_stride_px = max(1, int(round(stride_px / scale)))

    lv = slide.levels[level]
    if lv.width_px < read_px or lv.height_px < read_px:
        raise SlideTooSmallError(
            f"{slide.path.name}: the slide ({slide.dimensions[0]}x{slide.dimensions[1]} px at {slide.mpp:g} um/px) "
            f"is smaller than one {tile_px}-px tile at {tile_mpp:g} um/px; use a smaller --tile-px or a coarser --mpp"
        )
    xs = np.arange(0, lv.width_px - read_px + 1, read_stride_px, dtype=np.int64)
    ys = np.arange(0, lv.height_px - read_px + 1, read_stride_px, dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    read_xy = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    l0_xy = np.rint(read_xy * lv.downsample).astype(np.int64)
    return TileGrid(level, lv.downsample, read_px, read_stride_px, tile_px, stride_px, effective_mpp, l0_xy, read_xy)


def area_fractions(mask: np.ndarray, boxes_xy: np.ndarray, box_size: tuple[float, float]) -> np.ndarray:
    """Exact mean of ``mask`` over axis-aligned boxes given in mask pixel units.

    ``boxes_xy`` is (N, 2) top-left corners (x, y), ``box_size`` the (width, height); both
    may be fractional. The mask is a piecewise-constant function over unit pixel squares;
    its 2-D cumulative integral is bilinear between pixel corners, so interpolating the
    summed-area table at the box corners gives the exact integral.
    """
    h, w = mask.shape
    # integer sums: exact, and cheaper than float; 32-bit where they cannot overflow (half the
    # memory on the large thumbnails of large slides)
    peak = float(mask.max()) * mask.size if mask.size else 0.0
    dtype = np.int32 if peak < 2**31 and mask.dtype.kind in "bu" else np.int64
    sat = np.zeros((h + 1, w + 1), dtype)
    np.cumsum(np.cumsum(mask, axis=0, dtype=dtype), axis=1, out=sat[1:, 1:])

    def cumulative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0.0, w)
        y = np.clip(y, 0.0, h)
        x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
        y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - x0, y - y0
        return (
            sat[y0, x0] * (1 - fx) * (1 - fy) + sat[y0, x0 + 1] * fx * (1 - fy)
            + sat[y0 + 1, x0] * (1 - fx) * fy + sat[y0 + 1, x0 + 1] * fx * fy
        )

    bw, bh = box_size
    x0, y0 = boxes_xy[:, 0].astype(np.float64), boxes_xy[:, 1].astype(np.float64)
    x1, y1 = x0 + bw, y0 + bh
    total = cumulative(x1, y1) - cumulative(x0, y1) - cumulative(x1, y0) + cumulative(x0, y0)
    return (total / (bw * bh)).astype(np.float32)


def tissue_fractions(grid: TileGrid, tissue_mask: np.ndarray, thumb_scale_xy: tuple[float, float]) -> np.ndarray:
    """Fraction of each tile's footprint covered by ``tissue_mask`` (a thumbnail-frame mask).

    ``thumb_scale_xy`` is level-0 pixels per mask pixel along x and y.
    """
    sx, sy = thumb_scale_xy
    thumb_xy = grid.l0_xy / np.array([sx, sy])
    return area_fractions(tissue_mask, thumb_xy, (grid.tile_l0_px / sx, grid.tile_l0_px / sy))
