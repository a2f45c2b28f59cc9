"""The class mask as a tiled pyramidal palette TIFF that OpenSlide and slide viewers open.

Made from the levels of a finished ``mask.ome.zarr`` (see :mod:`gsd_wsi.masks.omezarr`),
so level k of the TIFF is level k of the pyramid (downsample 2^k, mode-reduced). What
OpenSlide's generic-TIFF reader needs, and what this writes:

- every level a top-level IFD (OpenSlide ignores SubIFDs, and would see only level 0),
  all tiled; level 0 SubfileType 0, reduced levels SubfileType 1 (reduced resolution);
- resolution tags in centimetres, XResolution = 10^4 / (mpp * 2^k) pixels per cm, from
  which OpenSlide derives ``openslide.mpp-x`` (level 0);
- photometric palette: one uint8 class index per pixel and a colour map of the class
  colours (16-bit, value * 257; unused entries black). OpenSlide decodes non-JPEG tiles
  through libtiff's RGBA path, which expands the palette, so ``read_region`` returns the
  class colours (checked with openslide-bin 4.0.1 in the tests);
- Adobe deflate (zlib) tiles: lossless and decoded by any libtiff build (OpenSlide's
  included; LZW and zstd also decode there) and by most other TIFF readers, which zstd is not.

Tiles are streamed: each level is read from zarr in bands of ``tile_px`` rows and cut into
tiles for tifffile, so memory stays at one band whatever the slide size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
import zarr

from gsd_wsi import __version__
from gsd_wsi.errors import ConfigError
from gsd_wsi.masks.files import atomic_output
from gsd_wsi.masks.omezarr import open_label_level, read_pyramid_info
from gsd_wsi.masks.palette import check_colors

log = logging.getLogger(__name__)

COMPRESSION = "adobe_deflate"
_BIGTIFF_BYTES = 2**31  # BigTIFF when the raw pixels pass 2 GiB: compressed size is unknown up front


def palette_colormap(colors: Sequence[Sequence[int]]) -> np.ndarray:
    """The TIFF colour map (3, 256) uint16 of the class colours; entries past them are black."""
    colours = check_colors(colors, len(colors))
    if len(colours) > 256:
        raise ConfigError(f"{len(colours)} colours given: a uint8 palette holds 256")
    colormap = np.zeros((3, 256), dtype=np.uint16)
    if colours:
        colormap[:, : len(colours)] = np.asarray(colours, dtype=np.uint16).T * 257
    return colormap


def _level_tiles(level: zarr.Array, tile_px: int) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order, read band by band (edge tiles are cut short;
    tifffile pads them with zeros)."""
    height, width = level.shape
    for y in range(0, height, tile_px):
        band = np.asarray(level[y: y + tile_px, :])
        for x in range(0, width, tile_px):
            yield band[:, x: x + tile_px]


def write_pyramidal_tiff(
    zarr_path: Path, tiff_path: Path, mpp: float | None = None, colors: Sequence[Sequence[int]] | None = None,
    tile_px: int = 512,
) -> list[tuple[int, int]]:
    """Write every level of the label pyramid at ``zarr_path`` to ``tiff_path`` (atomically).

    ``mpp`` (microns per mask level-0 pixel) and ``colors`` (one (r, g, b) per class)
    default to those recorded in the pyramid. Returns the (height, width) of each level.
    """
    if tile_px not in (256, 512):
        raise ConfigError(f"tile_px={tile_px!r}: use 256 or 512 (tile sizes slide viewers expect)")
    info = read_pyramid_info(Path(zarr_path))
    mpp = info.mpp if mpp is None else float(mpp)
    if not mpp > 0:
        raise ConfigError(f"mpp={mpp!r} must be a positive number of microns per mask pixel")
    colormap = palette_colormap(info.colors if colors is None else colors)
    shapes = list(info.level_shapes)
    names = ", ".join(f"{i}={name}" for i, name in enumerate(info.class_names))
    description = f"gsd-wsi {__version__} class mask; palette indices: {names}; level-0 mpp {mpp:.6g}"
    raw_bytes = sum(h * w for h, w in shapes)

    tiff_path = Path(tiff_path)
    with atomic_output(tiff_path) as tmp, tifffile.TiffWriter(tmp, bigtiff=raw_bytes > _BIGTIFF_BYTES) as writer:
        for k, shape in enumerate(shapes):
            px_per_cm = 1e4 / (mpp * 2**k)
            writer.write(
                _level_tiles(open_label_level(Path(zarr_path), k), tile_px), shape=shape, dtype=np.uint8,
                tile=(tile_px, tile_px), photometric="palette", colormap=colormap, compression=COMPRESSION,
                subfiletype=0 if k == 0 else 1, resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                description=description if k == 0 else None, software=f"gsd-wsi {__version__}",
                metadata=None, maxworkers=1,  # one encoder thread: tifffile would buffer batches of tiles
            )
    log.info("mask TIFF %s: %d levels, level 0 %dx%d px", tiff_path.name, len(shapes), shapes[0][1], shapes[0][0])
    return shapes
