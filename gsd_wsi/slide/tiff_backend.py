"""The fast path: tiled TIFF/SVS read as whole file tiles with tifffile + imagecodecs.

Why not only OpenSlide: its ``read_region`` composes every request through a cairo
surface with premultiplied alpha and copies pixels several times; on these machines it
delivers about 30 Mpx/s per thread, while libjpeg-turbo decodes the same JPEG tiles at
100-170 Mpx/s. Here each file tile is decoded once (an LRU cache keeps recent ones for
neighbouring and overlapping reads) and copied straight into the output. Reads may come
from several threads at once (the cache is locked, decoding is not), and a read of many
tiles, such as a thumbnail band of a slide without a pyramid, decodes on several threads. OpenSlide and
this reader decode with the same libjpeg-turbo, and the tests check that both give
identical pixels.

Only used for the layouts where that equivalence is checked: OpenSlide's ``aperio`` and
``generic-tiff`` vendors, 8-bit RGB, chunky tiles, with levels identical to OpenSlide's.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

from gsd_wsi.errors import SlideOpenError
from gsd_wsi.slide.base import Slide, SlideLevel, paste_into_canvas

logger = logging.getLogger(__name__)

_DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
#: A read needing at least this many undecoded file tiles decodes them on several threads
#: (libjpeg-turbo releases the GIL): a thumbnail read from level 0 of a slide without a
#: pyramid decodes every tile of the slide.
_PARALLEL_DECODE_TILES = 16
_DECODE_THREADS = min(4, os.cpu_count() or 1)


def fast_path_pages(tif: tifffile.TiffFile) -> list[tifffile.TiffPage] | None:
    """The pyramid pages (largest first) if this file suits the fast path, else None."""
    pages: list[tifffile.TiffPage] = []
    for page in tif.pages:
        page = page.keyframe if isinstance(page, tifffile.TiffFrame) else page
        if not page.is_tiled:
            continue  # Aperio thumbnails, labels and macros are stripped images
        if page.dtype != np.uint8 or page.samplesperpixel != 3 or page.planarconfig != 1:
            return None
        if page.photometric not in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
            return None
        if page.imagedepth > 1:
            return None
        pages.append(page)
    if not pages:
        return None
    pages.sort(key=lambda p: p.imagewidth * p.imagelength, reverse=True)
    return pages


class TiffSlide(Slide):
    """A tiled TIFF read tile-by-tile with tifffile (see the module docstring)."""

    backend = "tifffile"

    def __init__(
        self,
        path: Path,
        tif: tifffile.TiffFile,
        pages: list[tifffile.TiffPage],
        mpp: float,
        cache_bytes: int = _DEFAULT_CACHE_BYTES,
    ) -> None:
        w0, h0 = pages[0].imagewidth, pages[0].imagelength
        levels = tuple(
            # OpenSlide's definition of a level's downsample: the mean of the two axes' ratios.
            SlideLevel(i, p.imagewidth, p.imagelength, (w0 / p.imagewidth + h0 / p.imagelength) / 2.0)
            for i, p in enumerate(pages)
        )
        super().__init__(path, levels, mpp)
        self._tif = tif
        self._pages = pages
        self._fd = os.open(path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()  # reads may come from several threads; decoding runs outside it

    @classmethod
    def open(cls, path: Path, mpp: float) -> TiffSlide:
        """Open ``path`` for the fast path; raises SlideOpenError when the layout does not suit."""
        tif = tifffile.TiffFile(path)
        pages = fast_path_pages(tif)
        if pages is None:
            tif.close()
            raise SlideOpenError(f"{path}: not a tiled 8-bit RGB TIFF; the fast path does not apply")
        return cls(path, tif, pages, mpp)

    def limit_cache(self, max_bytes: int) -> None:
        """Keep at most ``max_bytes`` of decoded tiles (default 256 MiB), evicting the oldest
        now. Readers that walk a level in rows need only a few rows of file tiles, and a
        slide kept open after its thumbnail was read need not hold that level's tiles."""
        with self._cache_lock:
            self._cache_bytes = max(0, int(max_bytes))
            while self._cached_bytes > self._cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes

    def file_tile_px(self, level: int) -> tuple[int, int] | None:
        return self.file_tile_size(level)

    def file_tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of the TIFF's own tiles at ``level``."""
        page = self._pages[level]
        return page.tilewidth, page.tilelength

    def decode_file_tile(self, level: int, tile_index: int) -> np.ndarray:
        """Decode one file tile (full tile size, edge tiles padded) to (h, w, 3) uint8."""
        page = self._pages[level]
        offset, count = page.dataoffsets[tile_index], page.databytecounts[tile_index]
        tile_h, tile_w = page.tilelength, page.tilewidth
        if count == 0:  # a tile the scanner never wrote: glass
            return np.full((tile_h, tile_w, 3), 255, np.uint8)
        data = os.pread(self._fd, count, offset)
        decoded, _, _ = page.decode(data, tile_index, jpegtables=page.jpegtables)
        return decoded.reshape(tile_h, tile_w, 3)

    def _cached_tile(self, level: int, tile_index: int) -> np.ndarray:
        key = (level, tile_index)
        with self._cache_lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        tile = self.decode_file_tile(level, tile_index)
        tile.flags.writeable = False  # shared with the cache; callers copy before writing
        with self._cache_lock:
            if key not in self._cache:  # another thread may have decoded it meanwhile
                self._cache[key] = tile
                self._cached_bytes += tile.nbytes
            while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return tile

    def read_level_region(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        """As :meth:`Slide.read_level_region`; a read of exactly one file tile returns the
        cached decoded tile itself, read-only (``.copy()`` it to modify it)."""
        page = self._pages[level]
        x, y = level_xy
        width, height = size_px
        tile_w, tile_h = page.tilewidth, page.tilelength
        tiles_across = math.ceil(page.imagewidth / tile_w)
        if (
            x % tile_w == 0 and y % tile_h == 0 and (width, height) == (tile_w, tile_h)
            and x + width <= page.imagewidth and y + height <= page.imagelength
        ):  # exactly one whole file tile: the common case when the grid matches the file's
            return self._cached_tile(level, (y // tile_h) * tiles_across + x // tile_w)
        out = np.full((height, width, 3), 255, np.uint8)
        # Only tiles inside the image; areas beyond it stay white.
        ty0, ty1 = max(0, y // tile_h), min(math.ceil(page.imagelength / tile_h), -(-(y + height) // tile_h))
        tx0, tx1 = max(0, x // tile_w), min(tiles_across, -(-(x + width) // tile_w))
        indices = [ty * tiles_across + tx for ty in range(ty0, ty1) for tx in range(tx0, tx1)]
        with self._cache_lock:
            missing = [i for i in indices if (level, i) not in self._cache]
        if len(missing) < _PARALLEL_DECODE_TILES or _DECODE_THREADS == 1:
            for index in indices:
                self._paste_tile(level, index, self._cached_tile(level, index), (x, y), out)
            return out
        # A large read (a thumbnail band of a slide without a pyramid): the cached tiles first,
        # before the decoding evicts them; then the others decoded on several threads, each
        # pasted as it comes rather than looked up again in a cache that may have dropped it.
        to_decode = set(missing)
        for index in indices:
            if index not in to_decode:
                self._paste_tile(level, index, self._cached_tile(level, index), (x, y), out)
        with ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix="gsd-wsi-decode") as pool:
            for index, tile in zip(missing, pool.map(lambda i: self._cached_tile(level, i), missing)):
                self._paste_tile(level, index, tile, (x, y), out)
        return out

    def _paste_tile(self, level: int, tile_index: int, tile: np.ndarray, region_xy: tuple[int, int],
                    out: np.ndarray) -> None:
        page = self._pages[level]
        ty, tx = divmod(tile_index, math.ceil(page.imagewidth / page.tilewidth))
        # Crop edge tiles to the image so their padding never shows.
        valid = tile[: page.imagelength - ty * page.tilelength, : page.imagewidth - tx * page.tilewidth]
        paste_into_canvas(valid, (tx * page.tilewidth, ty * page.tilelength), region_xy, out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tif.close()
        self._cache.clear()
        self._cached_bytes = 0
