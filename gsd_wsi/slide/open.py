"""`open_slide`: choose the reader backend for a file and resolve its resolution.

``backend="auto"`` picks, in order: the tifffile fast path for Aperio SVS and generic tiled
TIFF whose levels match OpenSlide's; OpenSlide for every other format it knows; Pillow or
tifffile for plain images; tiatoolbox, when installed, for OME-Zarr and JP2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import openslide
import tifffile

from gsd_wsi.errors import ConfigError, SlideOpenError
from gsd_wsi.slide.base import Slide
from gsd_wsi.slide.image_backend import PLAIN_IMAGE_SUFFIXES, ImageSlide, read_plain_image
from gsd_wsi.slide.openslide_backend import OpenSlideSlide
from gsd_wsi.slide.resolution import mpp_from_properties, resolve_mpp
from gsd_wsi.slide.tiatoolbox_backend import (
    TIATOOLBOX_SUFFIXES,
    TiatoolboxSlide,
    open_with_tiatoolbox,
    tiatoolbox_available,
)
from gsd_wsi.slide.tiff_backend import TiffSlide, fast_path_pages

logger = logging.getLogger(__name__)

Backend = Literal["auto", "tifffile", "openslide", "image", "tiatoolbox"]
BACKENDS: tuple[str, ...] = ("auto", "tifffile", "openslide", "image", "tiatoolbox")
_FAST_PATH_VENDORS = frozenset({"aperio", "generic-tiff"})


def open_slide(path: str | Path, mpp: float | None = None, backend: Backend = "auto") -> Slide:
    """Open a slide for reading.

    ``mpp`` is used only when the file states no (believable) resolution. Raises
    SlideOpenError for a missing, unsupported or corrupt file and MissingResolutionError
    when no resolution is known.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown slide backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise SlideOpenError(f"{path}: no such file")
    if backend == "tiatoolbox" or (backend == "auto" and _is_tiatoolbox_format(path)):
        return _open_tiatoolbox(path, mpp)
    if path.is_dir():
        raise SlideOpenError(f"{path}: is a folder, not a slide file")

    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except openslide.OpenSlideError:
        vendor = None
    if backend in ("auto", "tifffile") and vendor in _FAST_PATH_VENDORS:
        fast = _try_fast_path(path, mpp)
        if fast is not None:
            return fast
        if backend == "tifffile":
            raise SlideOpenError(f"{path}: the tifffile fast path does not apply to this file; use backend 'openslide'")
    if backend in ("auto", "openslide") and vendor is not None:
        return _open_openslide(path, mpp)
    if backend in ("auto", "image") and path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        pixels, file_mpp = read_plain_image(path)
        return ImageSlide(path, pixels, resolve_mpp(path, file_mpp, mpp))
    hint = " (tiatoolbox, when installed, reads OME-Zarr and JP2)" if not tiatoolbox_available() else ""
    raise SlideOpenError(f"{path}: unsupported or corrupt slide file; no reader recognises it{hint}")


def _try_fast_path(path: Path, mpp: float | None) -> TiffSlide | None:
    """The fast path if the TIFF's pyramid matches what OpenSlide sees, else None.

    The resolution is OpenSlide's reading of the same file (Aperio ``MPP`` or the TIFF
    resolution tags), so both backends always agree on it.
    """
    with openslide.OpenSlide(path) as osr:
        openslide_levels = list(osr.level_dimensions)
        file_mpp = mpp_from_properties(osr.properties, path.name)
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError):
        return None
    pages = fast_path_pages(tif)
    if pages is None or [(p.imagewidth, p.imagelength) for p in pages] != openslide_levels:
        logger.debug("%s: layout differs from OpenSlide's; using OpenSlide", path)
        tif.close()
        return None
    try:
        return TiffSlide(path, tif, pages, resolve_mpp(path, file_mpp, mpp))
    except BaseException:
        tif.close()
        raise


def _open_openslide(path: Path, mpp: float | None) -> OpenSlideSlide:
    try:
        osr = openslide.OpenSlide(path)
    except openslide.OpenSlideError as exc:
        raise SlideOpenError(f"{path}: OpenSlide cannot read it ({exc}); the file may be corrupt") from exc
    try:
        return OpenSlideSlide(path, osr, resolve_mpp(path, mpp_from_properties(osr.properties, path.name), mpp))
    except BaseException:
        osr.close()
        raise


def _is_tiatoolbox_format(path: Path) -> bool:
    return any(str(path).lower().endswith(s) for s in TIATOOLBOX_SUFFIXES)


def _open_tiatoolbox(path: Path, mpp: float | None) -> TiatoolboxSlide:
    if not tiatoolbox_available():
        raise SlideOpenError(
            f"{path}: this format needs the optional tiatoolbox reader; install it with "
            f"`pip install tiatoolbox` (it requires torch <= 2.12)"
        )
    try:
        reader = open_with_tiatoolbox(path)
    except Exception as exc:  # tiatoolbox raises many types for unreadable files
        raise SlideOpenError(f"{path}: tiatoolbox cannot read it ({exc})") from exc
    return TiatoolboxSlide(path, reader, resolve_mpp(path, TiatoolboxSlide.mpp_of(reader, path.name), mpp))
