"""Reinhard colour transfer (Reinhard et al. 2001) in CIELAB, fitted once per slide.

Each LAB channel x of a pixel becomes (x - mean_s) * std_t / std_s + mean_t, with the
source statistics (mean_s, std_s) taken once from the tissue pixels of the slide (as
HistomicsTK does) and the target statistics from the tissue of a target image.

Colour space: sRGB (D65) -> CIELAB with the constants of scikit-image and torchstain
(L in 0..100); the inverse clips linear RGB to [0, 1]. Unlike torchstain, the output is
rounded to the nearest integer rather than truncated.

Being a global colour transfer, it moves glass along with tissue: glass (243, 243, 243) of
a slide whose tissue is lighter than the target comes out light pink-grey, e.g.
(210, 190, 198). The OD methods leave glass near white.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from gsd_wsi.errors import StainError
from gsd_wsi.stain.base import StainNormalizer, quantise, tissue_mask
from gsd_wsi.stain.macenko import HE_REF, MAX_C_REF

_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)

#: Built-in target: the LAB mean and std of the tissue pixels of Macenko's reference stains
#: (HE_REF, Io = 240) rendered over a uniform 64 x 64 grid of concentrations in
#: [0, MAX_C_REF], i.e. the appearance the Macenko and Vahadane presets aim at.
#: Recomputed by :func:`reference_lab_stats` (a test checks the two agree).
LAB_MEAN_REF: tuple[float, float, float] = (40.2234641, 25.2147452, -14.9860001)
LAB_STD_REF: tuple[float, float, float] = (14.2640751, 5.0666050, 5.4014179)

#: Source LAB standard deviations below this mean a single colour: nothing to transfer.
_MIN_STD = 1e-3


def _srgb_to_linear(dtype: type) -> np.ndarray:
    """Linear intensity of each 8-bit sRGB value, (256,)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    return np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92).astype(dtype)


def rgb_to_lab(pixels: np.ndarray, dtype: type = np.float64) -> list[np.ndarray]:
    """CIELAB channels [L, a, b] of (P, 3) uint8 sRGB pixels, elementwise in ``dtype``."""
    lin = [_srgb_to_linear(dtype).take(pixels[:, ch]) for ch in range(3)]
    m = (_RGB_TO_XYZ / _WHITE_D65[:, None]).astype(dtype)
    f = []
    for row in m:
        t = row[0] * lin[0] + row[1] * lin[1] + row[2] * lin[2]
        f.append(np.where(t > 0.008856, np.cbrt(t), t * dtype(7.787) + dtype(16.0 / 116.0)))
    lum = f[1] * dtype(116.0) - dtype(16.0)
    return [lum, (f[0] - f[1]) * dtype(500.0), (f[1] - f[2]) * dtype(200.0)]


def lab_to_rgb(lab: list[np.ndarray], dtype: type = np.float64) -> np.ndarray:
    """(P, 3) uint8 sRGB of CIELAB channels (inverse of :func:`rgb_to_lab`, clipped)."""
    fy = (lab[0] + dtype(16.0)) / dtype(116.0)
    f = [lab[1] / dtype(500.0) + fy, fy, fy - lab[2] / dtype(200.0)]
    xyz = [np.where(t > 0.2068966, t * t * t, (t - dtype(16.0 / 116.0)) / dtype(7.787)) for t in f]
    m = (_XYZ_TO_RGB * _WHITE_D65[None, :]).astype(dtype)
    out = np.empty((len(fy), 3), dtype=np.uint8)
    for ch, row in enumerate(m):
        lin = np.clip(row[0] * xyz[0] + row[1] * xyz[1] + row[2] * xyz[2], 0.0, 1.0)
        gamma = np.power(lin, dtype(1 / 2.4)) * dtype(1.055) - dtype(0.055)
        enc = np.where(lin > 0.0031308, gamma, lin * dtype(12.92))
        out[:, ch] = quantise(enc * dtype(255.0))
    return out


def lab_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation of each LAB channel of (N, 3) uint8 pixels."""
    lab = rgb_to_lab(pixels, np.float64)
    return np.array([c.mean() for c in lab]), np.array([c.std() for c in lab])


def reference_lab_stats() -> tuple[np.ndarray, np.ndarray]:
    """Recompute :data:`LAB_MEAN_REF` / :data:`LAB_STD_REF` from the Macenko reference."""
    grid = np.linspace(0.0, 1.0, 64)
    conc = np.stack(np.meshgrid(grid * MAX_C_REF[0], grid * MAX_C_REF[1]), -1).reshape(-1, 2)
    pixels = quantise(240.0 * np.exp(-conc @ np.asarray(HE_REF).T) - 1.0)
    defaults = StainNormalizer.defaults
    return lab_stats(pixels[tissue_mask(pixels, defaults["io"], defaults["beta"])])


class ReinhardNormalizer(StainNormalizer):
    """Reinhard normaliser: per-channel LAB mean/std matching with fixed source statistics.

    Parameters are ``mean`` and ``std`` (L, a, b). ``io`` and ``beta`` serve only to pick
    the tissue pixels the statistics come from.
    """

    method: ClassVar[str] = "reinhard"

    @classmethod
    def _builtin_target(cls) -> dict[str, Any]:
        return {"mean": list(LAB_MEAN_REF), "std": list(LAB_STD_REF)}

    def _estimate(self, tissue: np.ndarray) -> dict[str, Any]:
        mean, std = lab_stats(tissue)
        if not np.all(std > _MIN_STD):
            raise StainError(
                f"reinhard: the tissue pixels have no colour spread (LAB std {std.tolist()}); "
                f"pass tiles from several regions of the slide"
            )
        return {"mean": mean.tolist(), "std": std.tolist()}

    def _prepare(self) -> None:
        assert self._source is not None
        src_mean, src_std = (np.asarray(self._source[k], dtype=np.float64) for k in ("mean", "std"))
        tgt_mean, tgt_std = (np.asarray(self._target[k], dtype=np.float64) for k in ("mean", "std"))
        shapes_ok = src_mean.shape == src_std.shape == tgt_mean.shape == tgt_std.shape == (3,)
        if not (shapes_ok and np.all(src_std > _MIN_STD) and np.all(np.isfinite(tgt_std))):
            raise StainError(f"invalid reinhard params: source std {src_std}, target std {tgt_std}")
        gain = tgt_std / src_std
        # x' = gain * x + offset, the standardise-then-rescale of each LAB channel
        self._gain = gain.astype(np.float32)
        self._offset = (tgt_mean - gain * src_mean).astype(np.float32)

    def _map_pixels(self, pixels: np.ndarray) -> np.ndarray:
        lab = rgb_to_lab(pixels, np.float32)
        lab = [lab[ch] * self._gain[ch] + self._offset[ch] for ch in range(3)]
        return lab_to_rgb(lab, np.float32)
