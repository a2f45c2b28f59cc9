"""Synthetic H&E-like pyramidal whole-slide images with known ground truth.

:func:`write_synthetic_slide` renders smooth random tissue blobs (pink eosin stroma, dark
hematoxylin nuclei, gland rings with pale lumens) on a near-white background, optionally
with a faintly stained piece, a small biopsy, pen ink and a black scan border, and writes
them as a tiled JPEG pyramid (Aperio-style SVS or generic TIFF) that OpenSlide opens.
Tissue colour follows the optical-density stain model ``I = 240 * exp(-(H*h + E*e))``.

All geometry is analytic or defined on a grid at ``mask_downsample``; level-0 tiles
upsample it bilinearly, so the returned masks (sampled at mask-cell centres) are the
ground truth of what was drawn. Level 0 is a deterministic function of (spec, x, y);
reduced levels (downsample 4, 16, ...) are area averages of level 0.

:func:`write_fluorescence_slide` writes the opposite, a DAPI-like scan on a black
background, which gsd-wsi must refuse.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from functools import lru_cache
from numbers import Integral, Real
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile

from gsd_wsi.atomic import temporary_sibling
from gsd_wsi.errors import ConfigError

log = logging.getLogger(__name__)

I0 = 240.0
H_STAIN = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E_STAIN = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
PEN_RGB = {"blue": (40, 65, 165), "green": (35, 120, 65), "black": (30, 30, 36)}
BACKGROUND_RGB = (243.0, 243.0, 245.0)
BORDER_RGB = (16.0, 16.0, 19.0)
FAINT_SCALE = 0.25
_FAR = -1e4  # field value meaning "far outside"
_F32 = np.float32


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """What to draw; every field is validated (``ConfigError`` echoes the bad value)."""

    width_px: int = 6144
    height_px: int = 4096
    mpp: float = 0.5
    file_tile_px: int = 256
    fmt: Literal["svs", "tiff"] = "svs"
    jpeg_quality: int = 90
    #: "rgb": JPEG in RGB colour space, no chroma subsampling (3 samples per pixel to decode);
    #: "ycbcr": YCbCr with 4:2:0 subsampling (1.5 samples per pixel), as most scanners and
    #: tifffile's default for JPEG write it. libjpeg-turbo decodes the latter about 2x faster.
    jpeg_colour: Literal["rgb", "ycbcr"] = "rgb"
    n_tissue_regions: int = 3
    faint_region: bool = False
    small_biopsy: bool = False
    pen_marks: bool = False
    black_border: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {"width_px": (512, 250_000), "height_px": (512, 250_000), "file_tile_px": (16, 4096),
                "jpeg_quality": (1, 100), "n_tissue_regions": (0, 32), "seed": (0, 2**63 - 1)}
        for name, v in ((f.name, getattr(self, f.name)) for f in fields(self)):
            lo, hi = ints.get(name, (0, -1))
            if name in ints and (not isinstance(v, Integral) or isinstance(v, bool) or not lo <= v <= hi):
                raise ConfigError(f"{name}={v!r}: expected an integer in [{lo}, {hi}]")
            if isinstance(getattr(SyntheticSlideSpec, name), bool) and not isinstance(v, bool):
                raise ConfigError(f"{name}={v!r}: expected True or False")
        if self.file_tile_px % 16:
            raise ConfigError(f"file_tile_px={self.file_tile_px!r}: must be a multiple of 16")
        if not isinstance(self.mpp, Real) or isinstance(self.mpp, bool) or not 0.1 <= self.mpp <= 10.0:
            raise ConfigError(f"mpp={self.mpp!r}: expected microns per pixel in [0.1, 10]")  # NaN fails too
        if self.fmt not in ("svs", "tiff"):
            raise ConfigError(f"fmt={self.fmt!r}: expected 'svs' or 'tiff'")
        if self.jpeg_colour not in ("rgb", "ycbcr"):
            raise ConfigError(f"jpeg_colour={self.jpeg_colour!r}: expected 'rgb' or 'ycbcr'")


@dataclass(frozen=True, eq=False)
class SyntheticSlide:
    """A written slide and its ground truth (masks at level-0 size / ``mask_downsample``, sampled at cell centres)."""

    path: Path
    spec: SyntheticSlideSpec
    mask_downsample: int
    tissue_mask: np.ndarray
    pen_mask: np.ndarray
    gland_mask: np.ndarray
    level_downsamples: tuple[int, ...]
    border_mask: np.ndarray | None = None

    def tissue_fraction(self, x: int, y: int, width: int, height: int) -> float:
        """True tissue fraction of a level-0 rectangle, from the mask cells it covers."""
        d = self.mask_downsample
        cells = self.tissue_mask[max(y, 0) // d: -(-(y + height) // d), max(x, 0) // d: -(-(x + width) // d)]
        return float(cells.mean()) if cells.size else 0.0


@lru_cache(maxsize=64)
def _interp(rem: int, n: int, ds: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Bilinear weights of ``n`` pixels starting ``rem`` px into a cell: (first cell, idx, frac)."""
    g = (rem + np.arange(n) + 0.5) / ds - 0.5
    i0 = np.floor(g)
    return int(i0[0]), (i0 - i0[0]).astype(np.intp), (g - i0).astype(_F32)[:, None]


def _upsample(field: np.ndarray, y0: int, x0: int, n: int, ds: int) -> np.ndarray:
    """Level-0 values of an ``n`` x ``n`` tile of a (1-cell padded) mask-grid ``field``."""
    fy, iy, wy = _interp(y0 % ds, n, ds)
    fx, ix, wx = _interp(x0 % ds, n, ds)
    r0, c0 = y0 // ds + fy + 1, x0 // ds + fx + 1
    p = field[r0: r0 + iy[-1] + 2, c0: c0 + ix[-1] + 2]
    a = p[iy] * (1 - wy) + p[iy + 1] * wy
    return a[:, ix] * (1 - wx.T) + a[:, ix + 1] * wx.T


def _sample(field: np.ndarray, x: np.ndarray, y: np.ndarray, ds: int) -> np.ndarray:
    """Bilinear value of a padded mask-grid ``field`` at level-0 points (same rule as tiles)."""
    gx, gy = x / ds - 0.5, y / ds - 0.5
    ix = np.clip(np.floor(gx).astype(np.intp) + 1, 0, field.shape[1] - 2)
    iy = np.clip(np.floor(gy).astype(np.intp) + 1, 0, field.shape[0] - 2)
    fx, fy = np.clip(gx + 1 - ix, 0, 1), np.clip(gy + 1 - iy, 0, 1)
    top = field[iy, ix] * (1 - fx) + field[iy, ix + 1] * fx
    return top * (1 - fy) + (field[iy + 1, ix] * (1 - fx) + field[iy + 1, ix + 1] * fx) * fy


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth noise in about [-1, 1] on a grid, correlated over ``cell`` grid steps."""
    cy, cx = int(shape[0] / cell) + 3, int(shape[1] / cell) + 3
    coarse = rng.uniform(-1, 1, (cy, cx))
    ys, xs = np.arange(shape[0]) / cell + 1, np.arange(shape[1]) / cell + 1
    rows = np.stack([np.interp(xs, np.arange(cx), r) for r in coarse])
    return np.stack([np.interp(ys, np.arange(cy), c) for c in rows.T], axis=1).astype(_F32)


def _periodic_texture(rng: np.random.Generator, size: int, wavelength: float) -> np.ndarray:
    """Zero-mean unit-variance band-pass noise, periodic with period ``size`` (fibrous stroma)."""
    ky, kx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    kr = np.hypot(kx * 1.8, ky)  # mild anisotropy: streaks along x
    spec = np.exp(-(((kr - 1 / wavelength) * wavelength * 2.5) ** 2))
    tex = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * spec).real
    return ((tex - tex.mean()) / (tex.std() + 1e-9)).astype(_F32)


class _Scene:
    """Geometry, fields and textures of one slide; renders level-0 tiles."""

    def __init__(self, spec: SyntheticSlideSpec) -> None:
        self.spec = spec
        self.W, self.H, self.T = W, H, T = spec.width_px, spec.height_px, spec.file_tile_px
        self.ds = ds = 16 if max(W, H) <= 65536 else 64
        self.mh, self.mw = -(-H // ds), -(-W // ds)
        self.ntx, self.nty = -(-W // T), -(-H // T)
        self.cy, self.cx = (np.arange(self.mh) + 0.5) * ds, (np.arange(self.mw) + 0.5) * ds
        um = 1.0 / spec.mpp  # pixels per micron
        rng = lambda k: np.random.default_rng([spec.seed, k])  # noqa: E731  one stream per part
        bw = max(ds, round(0.025 * min(W, H) / ds) * ds)
        side = rng(1).integers(4)
        self.border_box = (0, 0, 0, 0)  # x0, y0, x1, y1 (level 0, ends past the image)
        if spec.black_border:
            self.border_box = [(0, 0, bw, H + ds), ((W - bw) // ds * ds, 0, W + ds, H + ds),
                               (0, 0, W + ds, bw), (0, (H - bw) // ds * ds, W + ds, H + ds)][side]
        x0, y0, x1, y1 = self.border_box
        self.border_cells = ((self.cy >= y0) & (self.cy < y1))[:, None] & ((self.cx >= x0) & (self.cx < x1))
        self._regions(rng(2), bw, um)
        self._glands(rng(3), um)
        self._nuclei(rng(4), um)
        self._pens(rng(5), um)
        self.P = P = max(1024, 2 * T)
        wrap = lambda a: np.pad(a, [(0, T), (0, T)] + [(0, 0)] * (a.ndim - 2), mode="wrap")  # noqa: E731
        self.fib = wrap(_periodic_texture(rng(6), P, 7.0 * um))
        t = rng(7)
        self.grain = wrap(t.standard_normal((P, P)).astype(_F32))
        noise = 0.8 * t.standard_normal((P, P, 1)) + 0.6 * t.standard_normal((P, P, 3))
        self.bg = wrap((np.asarray(BACKGROUND_RGB) + noise).astype(_F32))
        self.bg_u8 = np.clip(self.bg + 0.5, 0, 255).astype(np.uint8)

    def _pad(self, a: np.ndarray) -> np.ndarray:
        """Pad a mask-grid field by 1 cell before and enough after to cover all whole tiles."""
        extra = [(1, -(-n * self.T // self.ds) + 3 - m) for n, m in ((self.nty, self.mh), (self.ntx, self.mw))]
        return np.pad(a, extra, mode="edge")

    def _cells(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """Mask-grid rows and columns whose cells touch the level-0 box (with one cell margin)."""
        i0, j0 = max(int(y0 // self.ds) - 1, 0), max(int(x0 // self.ds) - 1, 0)
        return slice(i0, max(int(y1 // self.ds) + 2, i0)), slice(j0, max(int(x1 // self.ds) + 2, j0))

    def _regions(self, rng: np.random.Generator, bw: int, um: float) -> None:
        """Place non-overlapping blobs; tissue field ~ signed distance (px) to their outline."""
        W, H, s, gap = self.W, self.H, self.spec, 0.02 * min(self.W, self.H)
        kinds = ["normal"] * s.n_tissue_regions + ["faint"] * s.faint_region + ["biopsy"] * s.small_biopsy
        field, scale = np.full((self.mh, self.mw), _FAR, _F32), np.ones((self.mh, self.mw), _F32)
        cols = max(1, round(math.sqrt(len(kinds) * W / H)))  # one jittered grid slot per piece
        rows, margin = max(1, -(-len(kinds) // cols)), bw + gap
        cw, ch = (W - 2 * margin) / cols, (H - 2 * margin) / rows
        room = 0.5 * (min(cw, ch) - gap)  # largest allowed extent (centre to farthest edge)
        for kind, slot in zip(kinds, rng.permutation(rows * cols)):
            ar, amps = rng.uniform(1.6, 2.6) if kind == "biopsy" else rng.uniform(1.0, 1.4), rng.uniform(0, 0.08, 3)
            R = room / (1.12 + amps.sum()) * rng.uniform(0.85, 1.0)
            if kind == "biopsy":  # a core ~300-500 um long, if it fits
                amps, R = amps / 2, min(rng.uniform(150, 250) * um, R)
            phases, theta, ext = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0, np.pi), R * (1.12 + amps.sum())
            cx = margin + (slot % cols + 0.5) * cw + rng.uniform(-1, 1) * max(cw / 2 - gap / 2 - ext, 0)
            cy = margin + (slot // cols + 0.5) * ch + rng.uniform(-1, 1) * max(ch / 2 - gap / 2 - ext, 0)
            e = ext + 2 * self.ds
            si, sj = self._cells(cx - e, cy - e, cx + e, cy + e)
            dx, dy = self.cx[None, sj] - cx, self.cy[si, None] - cy
            u = dx * math.cos(theta) + dy * math.sin(theta)
            v = (dy * math.cos(theta) - dx * math.sin(theta)) * ar
            rad = R * (1 + sum(a * np.cos(k * np.arctan2(v, u) + p) for k, a, p in zip((2, 3, 5), amps, phases)))
            wobble = _smooth_noise(rng, u.shape, max(R / 3 / self.ds, 2)) * R * 0.08
            f = (rad - np.hypot(u, v) + wobble).astype(_F32)
            scale[si, sj] = np.where(f > field[si, sj], FAINT_SCALE if kind == "faint" else 1.0, scale[si, sj])
            field[si, sj] = np.maximum(field[si, sj], f)
        self.tissue_cells = field > 0
        self.tissue, self.scale = self._pad(field), self._pad(scale)
        self.evar = self._pad(1 + 0.18 * _smooth_noise(rng, field.shape, 40 * um / self.ds))
        self.hvar = self._pad(1 + 0.25 * _smooth_noise(rng, field.shape, 25 * um / self.ds))

    def _glands(self, rng: np.random.Generator, um: float) -> None:
        """Elliptic gland rings on a jittered grid, kept where they lie well inside tissue."""
        rmax, g = 50 * um, 180 * um  # one candidate per grid cell of g, jittered: glands never overlap
        self.gcell = g
        gy, gx = np.mgrid[0: int(self.H / g) + 1, 0: int(self.W / g) + 1]
        n = gy.size
        cx = (gx.ravel() + 0.5) * g + rng.uniform(-0.8, 0.8, n) * rmax
        cy = (gy.ravel() + 0.5) * g + rng.uniform(-0.8, 0.8, n) * rmax
        r_out, ar, theta = rng.uniform(25, 50, n) * um, rng.uniform(1.0, 1.4, n), rng.uniform(0, np.pi, n)
        keep = (rng.random(n) < 0.8) & (_sample(self.tissue, cx, cy, self.ds) > r_out * ar + 10 * um)
        self.gland_grid = np.where(keep, np.cumsum(keep), 0).reshape(gy.shape)  # gland index + 1
        self.gl = {"cx": cx[keep], "cy": cy[keep], "r_out": r_out[keep], "ar": ar[keep],
                   "cos": np.cos(theta[keep]), "sin": np.sin(theta[keep])}
        self.gl["r_in"] = self.gl["r_out"] - rng.uniform(10, 14, keep.sum()) * um
        cells = np.zeros((self.mh, self.mw), bool)
        for k, (x, y, r) in enumerate(zip(self.gl["cx"], self.gl["cy"], self.gl["r_out"])):
            si, sj = self._cells(x - r, y - r, x + r, y + r)
            cells[si, sj] |= self._gland_rho(k, self.cx[None, sj], self.cy[si, None]) < r
        self.gland_cells = cells & self.tissue_cells

    def _gland_rho(self, k: int | np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Elliptic radius (px along the long axis) of points relative to gland(s) ``k``."""
        gl = self.gl
        dx, dy = x - gl["cx"][k], y - gl["cy"][k]
        u = dx * gl["cos"][k] + dy * gl["sin"][k]
        return np.hypot(u, (dy * gl["cos"][k] - dx * gl["sin"][k]) * gl["ar"][k])

    def _nuclei(self, rng: np.random.Generator, um: float) -> None:
        """Stromal nuclei (Poisson, outside glands) plus epithelial nuclei along gland rings."""
        n = rng.poisson(self.W * self.H / (17 * um) ** 2)
        x, y = rng.uniform(0, self.W, n), rng.uniform(0, self.H, n)
        keep = _sample(self.tissue, x, y, self.ds) > 2
        gi, gj, grid = (y // self.gcell).astype(np.intp), (x // self.gcell).astype(np.intp), np.pad(self.gland_grid, 1)
        for di, dj in np.ndindex(3, 3):  # a gland near a point sits in one of the 3 x 3 grid cells around it
            h = np.flatnonzero((k := grid[gi + di, gj + dj] - 1) >= 0)
            keep[h[self._gland_rho(k[h], x[h], y[h]) < self.gl["r_out"][k[h]] + 4 * um]] = False
        x, y = x[keep], y[keep]
        m, lymph = len(x), rng.random(len(x)) < 0.2  # lymphocytes: small, round, dark
        a = np.where(lymph, rng.uniform(2.5, 3.5, m), rng.uniform(4.0, 6.5, m)) * um
        b = np.where(lymph, a * rng.uniform(0.85, 1.0, m), rng.uniform(1.6, 2.6, m) * um)
        gl = self.gl  # epithelial nuclei: a ring near the basal side, long axis radial
        rho = gl["r_in"] + 0.55 * (gl["r_out"] - gl["r_in"])
        counts = (2 * np.pi * rho / (7.5 * um)).astype(int)
        k = np.repeat(np.arange(len(rho)), counts)
        phi = (np.arange(len(k)) - np.repeat(np.cumsum(counts) - counts, counts)) * 2 * np.pi / counts[k]
        phi += rng.uniform(-0.05, 0.05, len(k))
        u, v = rho[k] * np.cos(phi), rho[k] * np.sin(phi) / gl["ar"][k]
        ex = gl["cx"][k] + u * gl["cos"][k] - v * gl["sin"][k]
        ey = gl["cy"][k] + u * gl["sin"][k] + v * gl["cos"][k]
        nuc = np.stack([np.r_[x, ex], np.r_[y, ey], np.r_[a, rng.uniform(3.5, 4.5, len(k)) * um],
                        np.r_[b, rng.uniform(2.3, 3.0, len(k)) * um],
                        np.r_[rng.uniform(0, np.pi, m), np.arctan2(ey - gl["cy"][k], ex - gl["cx"][k])],
                        np.r_[np.where(lymph, rng.uniform(1.5, 1.9, m), rng.uniform(0.9, 1.3, m)),
                              rng.uniform(1.0, 1.4, len(k))]])  # x, y, semi-axes, angle, hematoxylin
        tile = (nuc[1] // self.T).astype(np.int64) * self.ntx + (nuc[0] // self.T).astype(np.int64)
        order = np.argsort(tile, kind="stable")
        self.nuc = nuc[:, order].astype(_F32)
        self.nuc_start = np.searchsorted(tile[order], np.arange(self.ntx * self.nty + 1))
        self.nuc_half = int(math.ceil(6.5 * um)) + 2

    def _pens(self, rng: np.random.Generator, um: float) -> None:
        """Pen strokes (Bezier lines into tissue, arcs around it): fields = half width - distance."""
        self.pens: list[tuple[np.ndarray, np.ndarray]] = []
        self.pen_cells = np.zeros((self.mh, self.mw), bool)
        if not self.spec.pen_marks:
            return
        W, H, S = self.W, self.H, min(self.W, self.H)
        half = 0.5 * float(np.clip(S / 40, 32, 800 * um))
        targets = np.argwhere(self.tissue_cells)
        for i, colour in enumerate(rng.permutation(list(PEN_RGB))):
            t = np.linspace(0, 1, 64)[:, None]
            cy, cx = ((targets[rng.integers(len(targets))] + 0.5) * self.ds if len(targets)
                      else (rng.uniform(0.3, 0.7) * H, rng.uniform(0.3, 0.7) * W))
            if i % 2:  # open arc around a tissue point
                r, a = S * rng.uniform(0.12, 0.25), rng.uniform(0, 2 * np.pi) + t * rng.uniform(3.5, 5.5)
                pts = np.hstack([cx + r * np.cos(a), cy + r * 0.8 * np.sin(a)])
            else:  # quadratic Bezier from the glass into tissue
                p0, p2 = np.array([rng.uniform(0.05, 0.95) * W, rng.uniform(0.05, 0.95) * H]), np.array([cx, cy])
                p1 = (p0 + p2) / 2 + rng.normal(0, 0.15, 2) * S
                pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2
            pts = np.clip(pts, half, [W - half, H - half])
            dist = np.full((self.mh, self.mw), -_FAR, _F32)
            for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
                e = half + 2 * self.ds
                si, sj = self._cells(min(x0, x1) - e, min(y0, y1) - e, max(x0, x1) + e, max(y0, y1) + e)
                px, py, sx, sy = self.cx[None, sj] - x0, self.cy[si, None] - y0, x1 - x0, y1 - y0
                tt = np.clip((px * sx + py * sy) / max(sx * sx + sy * sy, 1e-9), 0, 1)
                dist[si, sj] = np.minimum(dist[si, sj], np.hypot(px - tt * sx, py - tt * sy))
            self.pen_cells |= dist < half
            self.pens.append((self._pad(half - dist), -np.log(np.asarray(PEN_RGB[str(colour)]) / I0).astype(_F32)))

    def masks(self) -> dict[str, np.ndarray]:
        """Ground-truth masks on the mask grid, sampled at cell centres."""
        free = ~self.pen_cells & ~self.border_cells
        return {"tissue_mask": self.tissue_cells & free, "pen_mask": self.pen_cells & ~self.border_cells,
                "gland_mask": self.gland_cells & free, "border_mask": self.border_cells}

    def tile(self, tx: int, ty: int) -> np.ndarray:
        """Level-0 RGB tile (T x T, uint8) at tile index (tx, ty); a function of (spec, x, y)."""
        T, ds, x0, y0 = self.T, self.ds, tx * self.T, ty * self.T
        oy, ox = y0 % self.P, x0 % self.P  # offsets into the periodic textures
        tissue = _upsample(self.tissue, y0, x0, T, ds)
        pens = [(p, od) for field, od in self.pens if (p := _upsample(field, y0, x0, T, ds)).max() > -1]
        bx0, by0, bx1, by1 = self.border_box
        border = bx1 > x0 and by1 > y0 and bx0 < x0 + T and by0 < y0 + T
        if tissue.max() <= -1 and not pens and not border:
            return self.bg_u8[oy: oy + T, ox: ox + T].copy()
        out, grain = self.bg[oy: oy + T, ox: ox + T], self.grain[oy: oy + T, ox: ox + T]
        if tissue.max() > -1:
            e = 0.5 * _upsample(self.evar, y0, x0, T, ds) * (1 + 0.22 * self.fib[oy: oy + T, ox: ox + T] + 0.05 * grain)
            h = 0.13 * _upsample(self.hvar, y0, x0, T, ds) * (1 + 0.05 * grain)
            self._draw_glands(x0, y0, e, h)
            h = h + self._nuclei_tile(tx, ty) * (1 + 0.12 * grain)
            od = (h[..., None] * H_STAIN + e[..., None] * E_STAIN) * _upsample(self.scale, y0, x0, T, ds)[..., None]
            alpha = np.clip(tissue * 0.7 + 0.5, 0, 1)[..., None]
            out = out + alpha * (I0 * np.exp(-od.astype(_F32)) - out)
        for pen, od in pens:  # ink absorbs on top of whatever lies below
            out = out * np.exp(-(np.clip(pen * 0.7 + 0.5, 0, 1) * (0.92 + 0.04 * grain))[..., None] * od)
        if border:
            out = out.copy()
            sl = slice(max(by0 - y0, 0), max(by1 - y0, 0)), slice(max(bx0 - x0, 0), max(bx1 - x0, 0))
            out[sl] = np.asarray(BORDER_RGB, _F32) + 2.0 * grain[..., None][sl]
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def _draw_glands(self, x0: int, y0: int, e: np.ndarray, h: np.ndarray) -> None:
        """Paint the glands touching the tile at (x0, y0) into its eosin/hematoxylin maps."""
        gl, T, r = self.gl, self.T, self.gl["r_out"] + 2
        gx, gy = gl["cx"] - x0, gl["cy"] - y0  # centres relative to the tile
        for k in np.flatnonzero((gx + r > 0) & (gx - r < T) & (gy + r > 0) & (gy - r < T)):
            i0, i1 = max(int(gy[k] - r[k]), 0), min(int(gy[k] + r[k]) + 2, T)
            j0, j1 = max(int(gx[k] - r[k]), 0), min(int(gx[k] + r[k]) + 2, T)
            rho = self._gland_rho(k, x0 + 0.5 + np.arange(j0, j1)[None], y0 + 0.5 + np.arange(i0, i1)[:, None])
            t_in, t_out = np.clip(rho - gl["r_in"][k] + 0.5, 0, 1), np.clip(rho - gl["r_out"][k] + 0.5, 0, 1)
            for m, lumen, epi in ((e, 0.07, 0.62), (h, 0.02, 0.30)):
                inner = lumen + (epi - lumen) * t_in
                m[i0:i1, j0:j1] = inner + (m[i0:i1, j0:j1] - inner) * t_out

    def _nuclei_tile(self, tx: int, ty: int) -> np.ndarray:
        """Hematoxylin of the nuclei overlapping tile (tx, ty), seam-free across tiles."""
        T, half = self.T, self.nuc_half
        out, r = np.zeros(T * T, _F32), -(-half // T)
        idx = np.concatenate([np.arange(self.nuc_start[j * self.ntx + i], self.nuc_start[j * self.ntx + i + 1])
                              for j in range(max(ty - r, 0), min(ty + r + 1, self.nty))
                              for i in range(max(tx - r, 0), min(tx + r + 1, self.ntx))])
        (x, y), x0, y0 = self.nuc[:2, idx], tx * T, ty * T
        near = idx[(x > x0 - half) & (x < x0 + T + half) & (y > y0 - half) & (y < y0 + T + half)]
        if not len(near):
            return out.reshape(T, T)
        x, y, a, b, th, st = self.nuc[:, near, None, None]
        c, s = np.cos(th), np.sin(th)
        w = np.arange(-half, half + 1)
        px, py = np.floor(x) + w[None, None, :], np.floor(y) + w[None, :, None]
        du, dv = px + 0.5 - x, py + 0.5 - y
        val = st * np.clip((1 - ((du * c + dv * s) / a) ** 2 - ((dv * c - du * s) / b) ** 2) * 3, 0, 1)
        lx, ly = (px - x0).astype(np.intp), (py - y0).astype(np.intp)
        ok = (lx >= 0) & (lx < T) & (ly >= 0) & (ly < T) & (val > 0)
        np.maximum.at(out, (ly * T + lx)[ok], val[ok])
        return out.reshape(T, T)


def _pool4(a: np.ndarray) -> np.ndarray:
    """Area average over 4x4 blocks (rounded), dropping incomplete edge blocks."""
    a = a[: a.shape[0] // 4 * 4, : a.shape[1] // 4 * 4]
    r = a[0::4].astype(np.uint16)  # a quarter-height uint16 buffer, not a full copy
    r += a[1::4]
    r += a[2::4]
    r += a[3::4]
    return ((r[:, 0::4] + r[:, 1::4] + r[:, 2::4] + r[:, 3::4] + 8) >> 4).astype(np.uint8)


def _pyramid_downsamples(spec: SyntheticSlideSpec) -> list[int]:
    downsamples = [1]
    while max(spec.width_px, spec.height_px) // downsamples[-1] > 2 * spec.file_tile_px:
        downsamples.append(downsamples[-1] * 4)
    return downsamples


def synthetic_truth(path: Path, spec: SyntheticSlideSpec) -> SyntheticSlide:
    """The ground truth of the slide ``spec`` draws (written before to ``path``), without
    drawing it again: the scene is a deterministic function of the spec."""
    scene = _Scene(spec)
    return SyntheticSlide(path=Path(path), spec=spec, mask_downsample=scene.ds,
                          level_downsamples=tuple(_pyramid_downsamples(spec)), **scene.masks())


def write_synthetic_slide(path: Path, spec: SyntheticSlideSpec = SyntheticSlideSpec()) -> SyntheticSlide:
    """Render ``spec`` and write it atomically to ``path``; returns the ground truth."""
    path = Path(path)
    t0 = time.perf_counter()
    scene = _Scene(spec)
    W, H, T, q = spec.width_px, spec.height_px, spec.file_tile_px, spec.jpeg_quality
    downsamples = _pyramid_downsamples(spec)
    levels = [np.zeros((H // 4, W // 4, 3), np.uint8)] if len(downsamples) > 1 else []

    def level0_tiles() -> Iterator[np.ndarray]:  # also fills level 1 with 4x4 area averages
        for ty, tx in np.ndindex(scene.nty, scene.ntx):
            tile = scene.tile(tx, ty)
            if levels:
                dst = levels[0][ty * T // 4: (ty + 1) * T // 4, tx * T // 4: (tx + 1) * T // 4]
                dst[...] = _pool4(tile)[: dst.shape[0], : dst.shape[1]]
            yield tile

    # JPEG in RGB colour space without subsampling (photometric RGB), or YCbCr 4:2:0 (photometric
    # YCbCr); one encoder thread, else tifffile buffers ~512 MB of raw tiles per batch
    jpeg = ({"subsampling": (1, 1), "compressionargs": {"level": q, "outcolorspace": "RGB"}} if spec.jpeg_colour == "rgb"
            else {"subsampling": (2, 2), "compressionargs": {"level": q}})
    common = {"photometric": "rgb", "compression": "jpeg", "tile": (T, T), "maxworkers": 1, **jpeg,
              "metadata": None, "resolutionunit": "CENTIMETER"}
    desc = (f"Aperio Image Library v12.0.0\r\n{W}x{H} ({T}x{T}) JPEG/RGB Q={q}"
            f"|AppMag = {20 if spec.mpp > 0.35 else 40}|MPP = {spec.mpp}") if spec.fmt == "svs" else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=W * H * 3 > 2**31) as tw:
            tw.write(level0_tiles(), shape=(H, W, 3), dtype=np.uint8, description=desc,
                     resolution=(1e4 / spec.mpp, 1e4 / spec.mpp), **common)
            level = levels[0]  # each further level is the 4x4 average of the one before
            for i, d in enumerate(downsamples[1:]):
                if i > 0:
                    level = _pool4(level)
                tw.write(level, subfiletype=1, resolution=(1e4 / (spec.mpp * d), 1e4 / (spec.mpp * d)), **common)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    masks = scene.masks()
    log.info("synthetic slide %s: %dx%d, %d levels, %.1f%% tissue, written in %.1fs", path.name, W, H,
             len(downsamples), 100 * masks["tissue_mask"].mean(), time.perf_counter() - t0)
    return SyntheticSlide(path=path, spec=spec, mask_downsample=scene.ds, level_downsamples=tuple(downsamples), **masks)


def write_fluorescence_slide(path: Path, width_px: int = 2048, height_px: int = 2048, mpp: float = 0.5,
                             seed: int = 0) -> Path:
    """A fluorescence-like slide, which gsd-wsi must refuse: a near-black background, a faint
    autofluorescent tissue ellipse holding bright blue (DAPI-like) nuclei, and a few green spots.

    Written atomically as a tiled, deflate-compressed generic TIFF pyramid (downsamples 1, 4,
    ... as :func:`write_synthetic_slide`) with resolution tags, so readers find its ``mpp``.
    """
    if not (isinstance(width_px, Integral) and isinstance(height_px, Integral) and min(width_px, height_px) >= 256):
        raise ConfigError(f"width_px={width_px!r}, height_px={height_px!r}: expected integers >= 256")
    if not isinstance(mpp, Real) or not 0.1 <= mpp <= 10.0:
        raise ConfigError(f"mpp={mpp!r}: expected microns per pixel in [0.1, 10]")
    path, rng, um, T = Path(path), np.random.default_rng(seed), 1.0 / mpp, 256
    W, H = int(width_px), int(height_px)
    img = rng.integers(0, 5, (H, W, 3), dtype=np.uint8)  # near-black with camera noise
    yy, xx = np.ogrid[0:H, 0:W]
    inside = ((yy - 0.5 * H) / (0.3 * H)) ** 2 + ((xx - 0.45 * W) / (0.35 * W)) ** 2 <= 1.0  # ~1/3 of the area
    img[inside] += np.asarray([3, 9, 16], np.uint8)  # tissue autofluorescence
    spots = [((0.05, 0.15, 1.0), 200.0, inside.sum() / (14 * um) ** 2, (3.0, 5.0)),  # DAPI nuclei
             ((0.15, 1.0, 0.2), 230.0, 20, (1.5, 2.5))]  # green (FITC-like) spots
    ys, xs = np.nonzero(inside)
    for colour, peak, n, (r_lo, r_hi) in spots:
        pick = rng.integers(len(ys), size=int(n))
        for y, x, r in zip(ys[pick], xs[pick], rng.uniform(r_lo, r_hi, len(pick)) * um):
            h = int(r) + 1
            y0, y1, x0, x1 = max(y - h, 0), min(y + h + 1, H), max(x - h, 0), min(x + h + 1, W)
            d2 = ((np.arange(y0, y1) - y)[:, None] ** 2 + (np.arange(x0, x1) - x)[None] ** 2) / (r * r)
            blob = np.clip((1 - d2) * 3, 0, 1)[..., None] * (np.asarray(colour) * peak * rng.uniform(0.6, 1.1))
            np.maximum(img[y0:y1, x0:x1], (blob + 0.5).astype(np.uint8), out=img[y0:y1, x0:x1])
    levels = [img]
    while max(levels[-1].shape[:2]) > 2 * T:
        levels.append(_pool4(levels[-1]))
    common = {"photometric": "rgb", "compression": "zlib", "compressionargs": {"level": 1}, "tile": (T, T),
              "metadata": None, "resolutionunit": "CENTIMETER"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with tifffile.TiffWriter(tmp) as tw:
            for i, level in enumerate(levels):
                res = 1e4 / (mpp * 4**i)
                tw.write(level, resolution=(res, res), **({"subfiletype": 1} if i else {}), **common)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
