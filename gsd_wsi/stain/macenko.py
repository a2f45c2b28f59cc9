"""Macenko stain normalisation (Macenko et al., ISBI 2009), fitted once per slide, and the
optical-density machinery it shares with Vahadane.

Beer-Lambert: OD = -log((I + 1) / Io) = S c, with S (3, 2) the unit stain vectors
(hematoxylin first, eosin second) and c the stain concentrations of a pixel. With the
source matrix S_s and target matrix S_t fixed, every pixel is mapped by

    c   = pinv(S_s) OD                      least squares (clipped at 0 by Vahadane)
    c' /= maxC_s / maxC_t                   99th-percentile concentrations matched
    I'  = Io exp(-S_t c') - 1               rounded to uint8

Parameters are ``stain_matrix`` (3 x 2 nested list, rows R, G, B) and ``max_c`` (2,).

Macenko's stain matrix: the tissue OD vectors lie near the plane of the two eigenvectors
of their covariance with the largest eigenvalues. Each pixel's angle in that plane is
phi = atan2(<od, e1>, <od, e2>) (e1 the largest); the stains are the directions at the
alpha-th and (100 - alpha)-th percentiles of phi, hematoxylin (more red OD) first. This is
the algorithm of the reference code and of torchstain; the sign of each eigenvector is
fixed here (projections mostly positive) so the result does not depend on LAPACK's choice.
Note: the covariance is centred, so the plane passes through the origin but need not hold
the mean OD; images whose mean lies off it keep a residual even when mapped onto
themselves (as in every implementation of the method).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np

from gsd_wsi.errors import StainError
from gsd_wsi.stain.base import StainNormalizer, od_table, quantise

#: The reference H&E of Macenko's code (github.com/mitkovetta/staining-normalization,
#: also torchstain, HEnorm_python): unit stain vectors (columns H, E; rows R, G, B) and the
#: 99th-percentile concentrations of its reference image, for Io = 240.
HE_REF: tuple[tuple[float, float], ...] = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
MAX_C_REF: tuple[float, float] = (1.9705, 1.0308)

#: Stain vectors closer than this (degrees) cannot be unmixed reliably.
_MIN_STAIN_ANGLE_DEG = 2.0
#: exp(-OD') is clamped here: Io * exp(16) is far above 255 for any Io >= 1, so the clamp
#: changes no output but keeps float32 from overflowing on extreme parameters.
_MAX_EXPONENT = np.float32(16.0)


def order_h_first(stains: np.ndarray) -> np.ndarray:
    """Order the columns of a (3, 2) stain matrix hematoxylin first.

    Hematoxylin (blue-purple) absorbs more red than eosin (pink), so it is the column with
    the larger red OD (the rule of Macenko's code and of StainTools).
    """
    return stains if stains[0, 0] >= stains[0, 1] else stains[:, ::-1]


def check_stain_matrix(stains: np.ndarray, what: str) -> np.ndarray:
    """Unit-normalise the columns and reject degenerate (non-finite, parallel) matrices."""
    stains = np.asarray(stains, dtype=np.float64)
    norms = np.linalg.norm(stains, axis=0)
    if stains.shape != (3, 2) or not np.all(np.isfinite(stains)) or np.any(norms <= 0):
        raise StainError(f"{what}: invalid stain matrix {stains.tolist()}")
    stains = stains / norms
    cos = float(np.clip(stains[:, 0] @ stains[:, 1], -1.0, 1.0))
    angle = np.degrees(np.arccos(cos))
    if angle < _MIN_STAIN_ANGLE_DEG:
        raise StainError(
            f"{what}: the two stain vectors are only {angle:.2f} degrees apart, so the "
            f"pixels hold one colour only; pass tissue stained with both H and E"
        )
    return stains


class StainMatrixNormalizer(StainNormalizer):
    """Base of the OD stain-matrix methods; subclasses estimate the stain matrix."""

    #: Clip least-squares concentrations at 0 (non-negative model) before rescaling.
    clip_concentrations: ClassVar[bool] = False

    @abstractmethod
    def _stain_matrix(self, od: np.ndarray) -> np.ndarray:
        """(3, 2) unit stain matrix, H first, of (N, 3) float64 tissue OD."""

    @classmethod
    def _builtin_target(cls) -> dict[str, Any]:
        return {"stain_matrix": [list(row) for row in HE_REF], "max_c": list(MAX_C_REF)}

    def _od(self, pixels: np.ndarray) -> np.ndarray:
        return od_table(self.settings["io"])[pixels]

    def concentrations(self, od: np.ndarray, stains: np.ndarray) -> np.ndarray:
        """(N, 2) least-squares concentrations of (N, 3) OD, clipped at 0 if the method does."""
        conc = od @ np.linalg.pinv(stains).T
        return np.maximum(conc, 0.0) if self.clip_concentrations else conc

    def _estimate(self, tissue: np.ndarray) -> dict[str, Any]:
        od = self._od(tissue)
        stains = check_stain_matrix(self._stain_matrix(od), f"{self.method} stain estimate")
        max_c = np.percentile(self.concentrations(od, stains), 99, axis=0)
        if not np.all(max_c > 0):
            raise StainError(
                f"{self.method}: the 99th-percentile stain concentrations {max_c.tolist()} "
                f"are not positive; the pixels hold too little stain"
            )
        return {"stain_matrix": stains.tolist(), "max_c": max_c.tolist()}

    def _prepare(self) -> None:
        assert self._source is not None
        src = check_stain_matrix(self._source["stain_matrix"], "source params")
        tgt = check_stain_matrix(self._target["stain_matrix"], "target params")
        src_max = np.asarray(self._source["max_c"], dtype=np.float64)
        tgt_max = np.asarray(self._target["max_c"], dtype=np.float64)
        both = np.concatenate([src_max.ravel(), tgt_max.ravel()])
        if src_max.shape != (2,) or tgt_max.shape != (2,) or not np.all(both > 0):
            raise StainError(f"invalid max_c in params: source {src_max}, target {tgt_max}")
        # Concentration coefficients with the percentile rescaling folded in (a positive
        # factor commutes with the clip at 0); float32 constants, elementwise use only.
        unmix = np.linalg.pinv(src) * (tgt_max / src_max)[:, None]
        self._unmix = unmix.astype(np.float32)  # (2, 3)
        self._mix = tgt.astype(np.float32)  # (3, 2)
        self._od32 = od_table(self.settings["io"]).astype(np.float32)
        self._io32 = np.float32(self.settings["io"])

    def _map_pixels(self, pixels: np.ndarray) -> np.ndarray:
        od = [self._od32.take(pixels[:, ch]) for ch in range(3)]
        conc = []
        for j in range(2):
            u = self._unmix[j]
            c = u[0] * od[0] + u[1] * od[1] + u[2] * od[2]
            if self.clip_concentrations:
                np.maximum(c, 0.0, out=c)
            conc.append(c)
        out = np.empty((len(pixels), 3), dtype=np.uint8)
        for ch in range(3):
            m = self._mix[ch]
            od_out = m[0] * conc[0] + m[1] * conc[1]
            np.negative(od_out, out=od_out)
            np.minimum(od_out, _MAX_EXPONENT, out=od_out)  # saturated anyway; no overflow
            np.exp(od_out, out=od_out)
            out[:, ch] = quantise(od_out * self._io32 - np.float32(1.0))
        return out


def macenko_stain_matrix(od: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """(3, 2) unit stain matrix, H first, of (N, 3) tissue optical densities."""
    if len(od) < 3:
        raise StainError(f"Macenko needs at least 3 tissue pixels, got {len(od)}")
    _, vecs = np.linalg.eigh(np.cov(od.T))  # ascending eigenvalues
    plane = vecs[:, 1:3].copy()  # columns: second largest, largest
    proj = od @ plane
    plane *= np.where(np.median(proj, axis=0) < 0, -1.0, 1.0)  # orient towards the data
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    return order_h_first(np.stack([v_lo, v_hi], axis=1))


class MacenkoNormalizer(StainMatrixNormalizer):
    """Macenko normaliser; concentrations by unconstrained least squares, as in the paper.

    Settings (besides those of :class:`StainNormalizer`): ``alpha``, the angular percentile
    (default 1). Default target: the reference ``HE_REF`` / ``MAX_C_REF`` of Macenko's code.
    """

    method: ClassVar[str] = "macenko"
    defaults: ClassVar[dict[str, Any]] = {**StainNormalizer.defaults, "alpha": 1.0}
    clip_concentrations: ClassVar[bool] = False

    def _stain_matrix(self, od: np.ndarray) -> np.ndarray:
        return macenko_stain_matrix(od, float(self.settings["alpha"]))
