"""A fitted colour map tabulated over all 2**24 8-bit RGB colours, and its fast lookup.

Exact 8-bit table rather than a coarse grid with trilinear interpolation: the full table
is 48 MiB, is built in about 0.15 s (OD methods) to 0.4 s (Reinhard) on one core by
running the float map itself on every colour (so a lookup is bit-identical to the float
path, which interpolation would not be), and a lookup costs one gather per pixel.
Colour code: r + 256 g + 65536 b.

The table pays off only for slides with more pixels to normalise than it has colours
(:func:`lut_pays_off`): building it costs the float map of 2**24 pixels, about 0.2 s, which
is most of the work of a small slide; fewer pixels go through the float map directly.

Lookup: the code of each pixel is read as a little-endian 32-bit word at every 3-byte step
of the image buffer with the 4th byte masked off (one pass, no per-channel temporaries);
the table is an array of 3-byte items, so gathering into a 3-byte view of the output
writes RGB in place. Work goes in chunks of 64 Ki pixels to stay in cache.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

N_COLOURS = 1 << 24
_BUILD_CHUNK = 1 << 16  # colours mapped at once while building (cache-sized temporaries)
_APPLY_CHUNK = 1 << 16  # pixels looked up at once


def lut_pays_off(n_pixels: int) -> bool:
    """Whether tabulating the map is cheaper than the float map on ``n_pixels`` pixels: the
    table runs the float map once per colour, so below 2**24 pixels it costs more than it saves
    (measured: the break-even lies at 17-18 Mpx for every method, lookups at ~320 Mpx/s)."""
    return n_pixels > N_COLOURS


def build_lut(map_pixels: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Tabulate ``map_pixels`` ((P, 3) uint8 -> (P, 3) uint8) as a (2**24,) 'V3' array."""
    table = np.empty((N_COLOURS, 3), dtype=np.uint8)
    for start in range(0, N_COLOURS, _BUILD_CHUNK):
        codes = np.arange(start, start + _BUILD_CHUNK, dtype="<u4")
        colours = codes.view(np.uint8).reshape(-1, 4)[:, :3]  # bytes of a code: r, g, b, 0
        table[start : start + _BUILD_CHUNK] = map_pixels(colours)
    return table.reshape(-1).view("V3")


def colour_codes(flat: np.ndarray) -> np.ndarray:
    """Code r + 256 g + 65536 b of each pixel of a C-contiguous flat uint8 RGB buffer.

    The word read at the last pixel would run one byte past the buffer, so that pixel is
    coded apart.
    """
    n = flat.size // 3
    out = np.empty(n, dtype="<u4")
    if n > 1:
        words = np.ndarray(shape=(n - 1,), dtype="<u4", buffer=flat, strides=(3,))
        np.bitwise_and(words, 0xFFFFFF, out=out[:-1])
    if n:
        r, g, b = (int(v) for v in flat[-3:])
        out[-1] = r | (g << 8) | (b << 16)
    return out


def apply_lut(lut: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Map uint8 (..., 3) ``rgb`` through a table from :func:`build_lut`; same shape out."""
    flat = np.ascontiguousarray(rgb).reshape(-1)
    out = np.empty(rgb.shape, dtype=np.uint8)
    out_v3 = out.reshape(-1).view("V3")
    step = _APPLY_CHUNK * 3
    for start in range(0, flat.size, step):
        codes = colour_codes(flat[start : start + step])
        first = start // 3
        # codes are < 2**24 by construction, so mode="clip" only skips the bounds check
        lut.take(codes, out=out_v3[first : first + codes.size], mode="clip")
    return out
