"""Optional backend: tiatoolbox's WSIReader, for what OpenSlide lacks (OME-Zarr/NGFF, JP2).

tiatoolbox is not a dependency: its releases pin torch < 2.13 and need torchvision. Users
on torch <= 2.12 install it with ``pip install tiatoolbox``; this backend is then used for
the formats only it reads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from gsd_wsi.slide.base import Slide, SlideLevel
from gsd_wsi.slide.resolution import plausible_mpp

#: Formats handed to tiatoolbox when it is installed (OpenSlide reads none of them).
TIATOOLBOX_SUFFIXES = frozenset({".zarr", ".jp2", ".ome.zarr"})


def tiatoolbox_available() -> bool:
    return importlib.util.find_spec("tiatoolbox") is not None


class TiatoolboxSlide(Slide):
    backend = "tiatoolbox"

    def __init__(self, path: Path, reader: Any, mpp: float) -> None:
        info = reader.info
        levels = tuple(
            SlideLevel(i, int(w), int(h), float(ds))
            for i, ((w, h), ds) in enumerate(zip(info.level_dimensions, info.level_downsamples))
        )
        super().__init__(path, levels, mpp)
        self._reader = reader

    @staticmethod
    def mpp_of(reader: Any, name: str) -> float | None:
        mpp = reader.info.mpp
        return None if mpp is None else plausible_mpp(float(np.asarray(mpp).ravel()[0]), f"{name} (tiatoolbox metadata)")

    def read_level_region(self, level: int, level_xy: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        ds = self.levels[level].downsample
        l0_xy = (int(round(level_xy[0] * ds)), int(round(level_xy[1] * ds)))
        region = self._reader.read_rect(l0_xy, size_px, resolution=level, units="level", coord_space="baseline")
        return np.ascontiguousarray(np.asarray(region)[..., :3].astype(np.uint8, copy=False))


def open_with_tiatoolbox(path: Path) -> Any:
    from tiatoolbox.wsicore.wsireader import WSIReader  # optional dependency

    return WSIReader.open(path)
