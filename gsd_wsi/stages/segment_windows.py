"""Where `segment`'s windows lie on a slide, and reading them in threads ahead of the network.

Frames: the **mask** is an image at the model's resolution; its level-0 pixel (x, y) covers
slide level-0 pixels (x*d, y*d) to ((x+1)*d, (y+1)*d), with d = mask mpp / slide mpp.
Windows are ``patch_px`` squares on the mask's pixel lattice (``mask_xy``); each is read from
the pyramid level just finer than the model's mpp and resized once (no resize when that
level's resolution is within 2 % of the model's, as `tile` does).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gsd_wsi.errors import ConfigError
from gsd_wsi.grid import MAX_UPSAMPLE, area_fractions
from gsd_wsi.slide import MPP_SNAP_TOLERANCE, Slide, open_slide
from gsd_wsi.stages.tile import read_tiles
from gsd_wsi.stain import StainNormalizer
from gsd_wsi.stain.deconvolution import haematoxylin_od
from gsd_wsi.stitch import window_starts

logger = logging.getLogger(__name__)


class ResolutionMismatchError(ConfigError):
    """The slide cannot be brought to the model's resolution without upsampling."""


@dataclass(frozen=True)
class MaskFrame:
    """The mask's pixel grid on a slide, and how its pixels are read."""

    width_px: int
    height_px: int
    mpp: float                  # microns per mask pixel (the model's, or the level's when snapped)
    downsample: float           # d: slide level-0 pixels per mask pixel
    level: int                  # the slide level windows are read from
    level_px_per_mask_px: float  # >= 1; 1.0 when that level is used as is

    def read_px(self, patch_px: int) -> int:
        """Side, in pixels of the level read, of a ``patch_px`` window."""
        return int(round(patch_px * self.level_px_per_mask_px))

    def level_xy(self, mask_xy: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(mask_xy) * self.level_px_per_mask_px).astype(np.int64)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"width_px": self.width_px, "height_px": self.height_px, "mpp": self.mpp,
                "slide_downsample": self.downsample, "level_read": self.level,
                "level_px_per_mask_px": self.level_px_per_mask_px,
                "geometry": "mask level-0 pixel (x, y) covers slide level-0 pixels (x*d, y*d) to ((x+1)*d, (y+1)*d), "
                            "d = slide_downsample"}


def mask_frame(slide: Slide, model_mpp: float) -> MaskFrame:
    """The mask grid for a model trained at ``model_mpp``; refuses to upsample a coarser scan."""
    if slide.mpp > model_mpp * MAX_UPSAMPLE:
        raise ResolutionMismatchError(
            f"{slide.path.name}: scanned at {slide.mpp:g} um/px, coarser than the model's {model_mpp:g} um/px, and "
            f"segment never upsamples; fine-tune a model at this resolution (gsd-wsi finetune --train-mpp "
            f"{slide.mpp:.3g}), or give --slide-mpp if the file's resolution is wrong"
        )
    level = slide.best_level_for_mpp(model_mpp)
    level_mpp = slide.level_mpp(level)
    scale = model_mpp / level_mpp
    if abs(scale - 1.0) <= MPP_SNAP_TOLERANCE:
        scale = 1.0
    mpp = level_mpp * scale
    downsample = mpp / slide.mpp
    width0, height0 = slide.dimensions
    return MaskFrame(max(1, math.ceil(width0 / downsample - 1e-9)), max(1, math.ceil(height0 / downsample - 1e-9)),
                     mpp, downsample, level, scale)


def plan_windows(frame: MaskFrame, tissue: np.ndarray, thumb_scale_xy: tuple[float, float], patch_px: int,
                 stride_px: int, margin_windows: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Windows over tissue, in rows top to bottom: (N, 2) ``mask_xy`` and each window's own
    tissue fraction.

    A window is kept when its footprint, grown by ``margin_windows`` window sides on every
    side, touches tissue, so nuclei at the tissue edge are seen whole and glass costs nothing.
    """
    xs = window_starts(frame.width_px, patch_px, stride_px)
    ys = window_starts(frame.height_px, patch_px, stride_px)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    mask_xy = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    sx, sy = thumb_scale_xy
    d = frame.downsample
    side_l0 = patch_px * d
    margin_l0 = margin_windows * side_l0
    thumb_xy = (mask_xy * d - margin_l0) / np.array([sx, sy])
    near = area_fractions(tissue, thumb_xy, ((side_l0 + 2 * margin_l0) / sx, (side_l0 + 2 * margin_l0) / sy)) > 0
    own = area_fractions(tissue, mask_xy * d / np.array([sx, sy]), (side_l0 / sx, side_l0 / sy))
    return mask_xy[near], own[near]


#: Backends whose one open slide serves several threads: tifffile (positional reads, a locked
#: tile cache, decoding outside the lock), OpenSlide (thread-safe by its documentation) and
#: plain images (a read-only array). Others get one open slide per thread.
_SHARED_BACKENDS = frozenset({"tifffile", "openslide", "image"})
#: Reader threads run at this nice level: on a CPU the network's own threads come first, and
#: readers fill the queue in the gaps (a reader taking a core mid-forward stalls every
#: thread of the network's parallel region).
_READER_NICE = 5


class WindowReader:
    """Reads, resizes and stain-normalises batches of windows in ``workers`` threads, ahead of
    the caller, in order. The slide is opened once (shared by the threads where its backend
    allows, so each file tile is decoded once, else once per thread); at most
    ``2 * workers`` batches wait, so memory stays bounded. Decoding (imagecodecs), resizing
    (Pillow) and the colour lookup (numpy) release the GIL, so threads overlap with the
    network and with each other.
    """

    def __init__(self, path: Path, slide_mpp: float, backend: str, frame: MaskFrame, patch_px: int,
                 normaliser: StainNormalizer, workers: int = 2, stain_table: bool = True,
                 haematoxylin: bool = False) -> None:
        self.path, self.slide_mpp, self.backend = Path(path), slide_mpp, backend
        self.haematoxylin = haematoxylin  # batches also carry the haematoxylin OD of the raw pixels
        self.frame, self.patch_px, self.normaliser, self.workers = frame, patch_px, normaliser, workers
        self.stain_table = stain_table   # normalise through the 2**24 colour table, else the float map
        self._local = threading.local()
        self._shared: Slide | None = None
        self._opened: list[Slide] = []
        self._opened_lock = threading.Lock()
        self.read_seconds = 0.0          # summed over threads

    def _slide(self) -> Slide:
        if self._shared is not None:
            return self._shared
        slide = getattr(self._local, "slide", None)
        if slide is None:
            with self._opened_lock:
                if self._shared is not None:
                    return self._shared
                slide = open_slide(self.path, mpp=self.slide_mpp, backend=self.backend)  # type: ignore[arg-type]
                slide.limit_cache(self._cache_bytes(slide))
                self._opened.append(slide)
                if slide.backend in _SHARED_BACKENDS:
                    self._shared = slide
            self._local.slide = slide
        return slide

    @staticmethod
    def _lower_priority() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _READER_NICE)
        except (AttributeError, OSError):  # not Linux, or not allowed: run at the usual priority
            pass

    def _cache_bytes(self, slide: Slide) -> int:
        """Decoded file tiles worth three tile rows of the level read (windows walk it in rows,
        each spanning at most two), with an 8 MiB floor: enough that no tile is decoded twice
        within a row of windows, flat however long the slide."""
        level = slide.levels[self.frame.level]
        tile = slide.file_tile_px(self.frame.level)
        rows_px = max(3 * (tile[1] if tile else 256), 2 * self.frame.read_px(self.patch_px))
        return max(8 << 20, rows_px * level.width_px * 3)

    def read(self, mask_xy: np.ndarray, normalise: bool = True) -> np.ndarray:
        """(N, patch_px, patch_px, 3) uint8 windows at ``mask_xy``, stain-normalised unless told not."""
        return self._read(mask_xy, normalise)[0]

    def _read(self, mask_xy: np.ndarray, normalise: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The windows, and their haematoxylin OD (N, patch_px, patch_px) float32 when asked."""
        started = time.perf_counter()
        tiles = read_tiles(self._slide(), self.frame.level, self.frame.level_xy(mask_xy),
                           self.frame.read_px(self.patch_px), self.patch_px)
        od = haematoxylin_od(tiles) if self.haematoxylin else None  # measured on the scan, not the normalised
        out = self.normaliser.transform(tiles, use_lut=self.stain_table) if normalise else tiles
        with self._opened_lock:
            self.read_seconds += time.perf_counter() - started
        return out, od

    def batches(self, mask_xy: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(mask_xy, windows, haematoxylin OD or None) per batch, in the order of ``mask_xy``."""
        starts = range(0, len(mask_xy), batch_size)
        pending: deque[tuple[np.ndarray, Future[tuple[np.ndarray, np.ndarray | None]]]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="gsd-wsi-reader",
                                initializer=self._lower_priority) as pool:
            try:
                for start in starts:
                    xy = mask_xy[start: start + batch_size]
                    pending.append((xy, pool.submit(self._read, xy)))
                    if len(pending) >= 2 * self.workers:
                        xy_done, future = pending.popleft()
                        yield (xy_done, *future.result())
                while pending:
                    xy_done, future = pending.popleft()
                    yield (xy_done, *future.result())
            finally:
                for _, future in pending:
                    future.cancel()

    def close(self) -> None:
        with self._opened_lock:
            for slide in self._opened:
                slide.close()
            self._opened.clear()
