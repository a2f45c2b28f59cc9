"""Haematoxylin optical density by colour deconvolution, as QuPath measures nuclei.

Beer-Lambert per channel, ``OD = log10(255 / max(I, 1))``, then the OD vector is unmixed
into stain amounts with the inverse of the stain matrix: Ruifrok & Johnston's H&E vectors
(haematoxylin 0.650, 0.704, 0.286; eosin 0.072, 0.990, 0.105; QuPath's default "H&E"), the
third row their normalised cross product, so that the residual takes only what neither stain
explains. A nucleus's "Hematoxylin OD mean" is then in the units of QuPath's cell detection.
(scikit-image's ``rgb2hed`` is not used: it scales OD by ``1 / log(1e-6)``, not OD units,
and fixes a non-orthogonal third vector.) Numpy only.
"""

from __future__ import annotations

import numpy as np

#: Ruifrok & Johnston's H&E stain vectors (rows: haematoxylin, eosin), unit length.
HE_VECTORS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])


def _unmixing() -> np.ndarray:
    h, e = (v / np.linalg.norm(v) for v in HE_VECTORS)
    residual = np.cross(h, e)
    residual /= np.linalg.norm(residual)
    return np.linalg.inv(np.stack([h, e, residual]))  # OD (row) @ this -> (h, e, residual)


#: log10(255 / max(v, 1)) of every 8-bit value, times the haematoxylin column of the unmixing
#: matrix, per channel: the haematoxylin OD of a pixel is the sum of three table lookups.
_H_TABLES = (np.log10(255.0 / np.maximum(np.arange(256), 1.0))[None, :] * _unmixing()[:, 0][:, None]).astype(np.float32)


def haematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (float32, shape of ``rgb`` without its last axis) of uint8 RGB.

    0 on white glass; about 0.3-1.0 in haematoxylin-stained nuclei of a typical H&E scan.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"haematoxylin_od needs uint8 RGB (..., 3), got {rgb.dtype} {rgb.shape}")
    out = _H_TABLES[0][rgb[..., 0]]
    out += _H_TABLES[1][rgb[..., 1]]
    out += _H_TABLES[2][rgb[..., 2]]
    return out
