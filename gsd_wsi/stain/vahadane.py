"""Vahadane stain normalisation (Vahadane et al., IEEE TMI 2016), in numpy.

Sparse non-negative matrix factorisation of tissue OD (rows = pixels):

    min_{W >= 0, |w_j| <= 1, H >= 0}  1/2 |OD - H W^T|^2 + lambda sum |H|

W (3, 2) the stain matrix, H (N, 2) the concentrations. It is solved by alternating
minimisation on a seeded subsample of tissue pixels (``max_dl_pixels``):

* H step: for two stains the non-negative lasso has a closed form. If the unconstrained
  minimiser G^-1 (W^T od - lambda) (G = W^T W) is positive it is the solution; otherwise
  the best of the one-stain solutions max(0, (w_j.od - lambda) / |w_j|^2) and zero.
* W step: block coordinate descent of Mairal et al. (2010): w_j += (B_j - W A_j) / A_jj
  with A = H^T H, B = OD^T H, then projection onto w >= 0, |w| <= 1.

It starts from the Macenko estimate (a good, deterministic initial point) and stops when
W changes by less than ``tol``. Applying the fitted matrices is as for Macenko, except
that least-squares concentrations are clipped at 0 (the model is non-negative); so that
white stays white, Io defaults to 255 here (the convention of Vahadane's code/StainTools).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from gsd_wsi.stain.base import StainNormalizer, subsample
from gsd_wsi.stain.macenko import HE_REF, StainMatrixNormalizer, macenko_stain_matrix, order_h_first

logger = logging.getLogger(__name__)


def nonneg_lasso_2(od: np.ndarray, stains: np.ndarray, lam: float) -> np.ndarray:
    """Exact (N, 2) argmin_{h >= 0} 1/2 |od - W h|^2 + lam (h_1 + h_2) for (N, 3) od."""
    gram = stains.T @ stains
    b = od @ stains - lam  # (N, 2): linear term of the quadratic
    det = max(gram[0, 0] * gram[1, 1] - gram[0, 1] ** 2, 1e-12)  # > 0 unless W collapses
    both = np.stack(
        [gram[1, 1] * b[:, 0] - gram[0, 1] * b[:, 1], gram[0, 0] * b[:, 1] - gram[0, 1] * b[:, 0]],
        axis=1,
    ) / det
    h1 = np.maximum(b[:, 0] / gram[0, 0], 0.0)
    h2 = np.maximum(b[:, 1] / gram[1, 1], 0.0)
    # objective (up to a constant) of the one-stain candidates: 1/2 g h^2 - b h
    f1 = 0.5 * gram[0, 0] * h1**2 - b[:, 0] * h1
    f2 = 0.5 * gram[1, 1] * h2**2 - b[:, 1] * h2
    single = np.where((f1 <= f2)[:, None], np.stack([h1, 0 * h1], 1), np.stack([0 * h2, h2], 1))
    interior = np.all(both > 0, axis=1)
    return np.where(interior[:, None], both, single)


def _update_dictionary(od: np.ndarray, conc: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """One block-coordinate pass over the stain vectors (non-negative, norm <= 1)."""
    a = conc.T @ conc
    b = od.T @ conc
    stains = stains.copy()
    for j in range(2):
        if a[j, j] <= 1e-12:
            continue  # stain unused by every pixel: keep it
        u = np.maximum(stains[:, j] + (b[:, j] - stains @ a[:, j]) / a[j, j], 0.0)
        norm = float(np.linalg.norm(u))
        if norm > 1e-12:  # a vector projected to 0 keeps its previous value
            stains[:, j] = u / max(norm, 1.0)
    return stains


def vahadane_stain_matrix(
    od: np.ndarray, lam: float = 0.1, n_iter: int = 200, tol: float = 1e-6
) -> np.ndarray:
    """(3, 2) stain matrix, H first, of (N, 3) tissue OD by sparse NMF."""
    try:
        stains = np.maximum(macenko_stain_matrix(od), 0.0)
    except np.linalg.LinAlgError:
        stains = np.asarray(HE_REF)
    stains = stains / np.maximum(np.linalg.norm(stains, axis=0), 1e-12)
    if not np.all(np.isfinite(stains)) or np.any(stains.sum(axis=0) <= 0):
        stains = np.asarray(HE_REF, dtype=np.float64)
    for it in range(n_iter):
        conc = nonneg_lasso_2(od, stains, lam)
        new = _update_dictionary(od, conc, stains)
        delta = float(np.abs(new - stains).max())
        stains = new
        if delta < tol:
            break
    logger.debug("Vahadane dictionary learning: %d iterations, last change %.2e", it + 1, delta)
    return order_h_first(stains)


class VahadaneNormalizer(StainMatrixNormalizer):
    """Vahadane normaliser with a numpy sparse-NMF stain estimate.

    Settings: ``lambda_`` (L1 weight on concentrations, 0.1), ``max_dl_pixels`` (tissue
    pixels the factorisation sees, 50 000), ``n_iter`` (at most 200 alternations), ``io``
    (255). Default target: Macenko's reference ``HE_REF`` / ``MAX_C_REF``.
    """

    method: ClassVar[str] = "vahadane"
    defaults: ClassVar[dict[str, Any]] = {
        **StainNormalizer.defaults,
        "io": 255.0,
        "lambda_": 0.1,
        "max_dl_pixels": 50_000,
        "n_iter": 200,
    }
    clip_concentrations: ClassVar[bool] = True

    def _stain_matrix(self, od: np.ndarray) -> np.ndarray:
        sample = subsample(od, int(self.settings["max_dl_pixels"]), int(self.settings["seed"]))
        return vahadane_stain_matrix(
            sample, float(self.settings["lambda_"]), int(self.settings["n_iter"])
        )
