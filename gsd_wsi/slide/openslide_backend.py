"""Every format OpenSlide reads: svs, ndpi, mrxs, scn, bif, vms, generic tiled TIFF, DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from gsd_wsi.slide.base import Slide, SlideLevel


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA (transparent where nothing was scanned) over white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path, osr: openslide.OpenSlide, mpp: float) -> None:
        levels = tuple(
            SlideLevel(i, w, h, float(ds))
            for i, ((w, h), ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples))
        )
        super().__init__(path, levels, mpp)
        self._osr = osr

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    @property
    def bounds_l0_xy(self) -> tuple[int, int]:
        props = self._osr.properties
        return int(props.get("openslide.bounds-x", 0)), int(props.get("openslide.bounds-y", 0))

    def read_level_region(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        ds = self.levels[level].downsample
        # OpenSlide takes level-0 coordinates; for exact level positions they must map back
        # to integers, which holds for the integer downsamples of real pyramids.
        l0_xy = (int(round(level_xy[0] * ds)), int(round(level_xy[1] * ds)))
        region = self._osr.read_region(l0_xy, level, size_px)
        return rgba_to_rgb_on_white(np.asarray(region))

    def read_region(self, l0_xy: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        return rgba_to_rgb_on_white(np.asarray(self._osr.read_region(l0_xy, level, size_px)))

    def close(self) -> None:
        self._osr.close()
