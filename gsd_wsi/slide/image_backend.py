"""Plain images (PNG, JPEG, BMP, non-pyramidal TIFF): one level, held in memory.

These are small by nature (microscope snapshots, dataset tiles); a gigapixel image belongs
in a pyramidal format, and a warning says so when a plain image exceeds 100 Mpx.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from gsd_wsi.errors import SlideOpenError
from gsd_wsi.slide.base import Slide, SlideLevel, paste_into_canvas
from gsd_wsi.slide.resolution import mpp_from_tiff, plausible_mpp

logger = logging.getLogger(__name__)

PLAIN_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_LARGE_PLAIN_PX = 100_000_000


def _to_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise SlideOpenError(f"{path}: expected an RGB image, got an array of shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise SlideOpenError(f"{path}: expected 8-bit pixels, got {pixels.dtype}; convert it to 8-bit RGB")
    return np.ascontiguousarray(pixels[..., :3])


def read_plain_image(path: Path) -> tuple[np.ndarray, float | None]:
    """Pixels as (H, W, 3) uint8 and the resolution the file states, if believable."""
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tif:
                return _to_rgb(tif.pages.first.asarray(), path), mpp_from_tiff(tif, path.name)
        except (tifffile.TiffFileError, ValueError, OSError) as exc:
            raise SlideOpenError(f"{path}: unreadable TIFF ({exc})") from exc
    try:
        with Image.open(path) as image:
            dpi = image.info.get("dpi")
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise SlideOpenError(f"{path}: unreadable image ({exc})") from exc
    mpp = plausible_mpp(25400.0 / float(dpi[0]), f"{path.name} (image dpi)") if dpi and float(dpi[0]) > 0 else None
    return pixels, mpp


class ImageSlide(Slide):
    backend = "image"

    def __init__(self, path: Path, pixels: np.ndarray, mpp: float) -> None:
        height, width = pixels.shape[:2]
        if height * width > _LARGE_PLAIN_PX:
            logger.warning("%s: a %dx%d plain image is held in memory; convert it to a pyramidal TIFF", path, width, height)
        super().__init__(path, (SlideLevel(0, width, height, 1.0),), mpp)
        self._pixels = pixels

    def read_level_region(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        width, height = size_px
        out = np.full((height, width, 3), 255, np.uint8)
        paste_into_canvas(self._pixels, (0, 0), level_xy, out)
        return out
