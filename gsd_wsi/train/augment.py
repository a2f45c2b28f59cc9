"""Fine-tuning augmentation (docs/method.md section 3), MONAI dictionary transforms.

Geometric transforms move the image and its label together (labels by nearest neighbour,
so class indices stay class indices): flips, 90-degree rotations, elastic deformation.
Photometric transforms change the image only: Gaussian blur (p 0.3), brightness and
contrast (p 0.3), and H&E stain jitter. Inputs and outputs are ``{"image": (3, H, W) float
in [0, 1], "label": (1, H, W)}``.

Stain jitter is not in MONAI: it perturbs each of the haematoxylin, eosin and DAB optical
densities by ``od * alpha + beta`` (Tellez et al. 2018), written here in a few lines.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
)

# Ruifrok & Johnston's H&E-DAB stain vectors (rows: H, E, DAB) in optical density.
_HED_FROM_RGB = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
_RGB_FROM_HED = np.linalg.inv(_HED_FROM_RGB)
_OD_FLOOR = 1e-6


class RandStainJitterd(RandomizableTransform, MapTransform):
    """Random H&E(-DAB) jitter in optical-density space, image keys only."""

    def __init__(self, keys: str | tuple[str, ...], prob: float = 0.5, alpha: float = 0.05, beta: float = 0.02) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.alpha, self.beta = alpha, beta
        self._scale = np.ones(3)
        self._shift = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._scale = self.R.uniform(1 - self.alpha, 1 + self.alpha, 3)
        self._shift = self.R.uniform(-self.beta, self.beta, 3)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.randomize()
        out = dict(data)
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            out[key] = jitter_stains(out[key], self._scale, self._shift)
        return out


def jitter_stains(image: Any, scale: np.ndarray, shift: np.ndarray) -> torch.Tensor:
    """``image`` (3, H, W) in [0, 1]: HED optical densities scaled and shifted, back to RGB."""
    x = torch.as_tensor(image, dtype=torch.float32)
    od = -torch.log(x.clamp_min(_OD_FLOOR)).permute(1, 2, 0)  # (H, W, 3)
    hed = od @ torch.as_tensor(_HED_FROM_RGB, dtype=torch.float32)
    hed = hed * torch.as_tensor(scale, dtype=torch.float32) + torch.as_tensor(shift, dtype=torch.float32)
    rgb = torch.exp(-(hed @ torch.as_tensor(_RGB_FROM_HED, dtype=torch.float32)))
    return rgb.permute(2, 0, 1).clamp(0.0, 1.0)


def training_augmentation(patch_px: int, seed: int = 0) -> Compose:
    """The joint geometric and image-only photometric augmentation of fine-tuning."""
    both = ("image", "label")
    transforms = Compose([
        RandFlipd(both, prob=0.5, spatial_axis=0),
        RandFlipd(both, prob=0.5, spatial_axis=1),
        RandRotate90d(both, prob=0.5, max_k=3),
        Rand2DElasticd(both, spacing=(patch_px // 4, patch_px // 4), magnitude_range=(0.0, 2.0), prob=0.3,
                       mode=("bilinear", "nearest"), padding_mode="reflection"),
        RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=0.3),
        RandScaleIntensityd("image", factors=0.1, prob=0.3),          # brightness
        RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.3),     # contrast
        RandStainJitterd("image", prob=0.5),
    ])
    transforms.set_random_state(seed=seed)
    return transforms
