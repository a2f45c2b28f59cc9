"""Segmentation losses for fine-tuning (docs/method.md section 3).

``ss+focal`` (the method's): structural-similarity loss plus focal loss, weights 1 : 1.
``dice+ce``: MONAI's DiceCELoss, the common baseline.

All logarithms come from ``log_softmax``, never ``log(softmax)``: the reference takes the log
of probabilities that can underflow to 0 and then produces NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsd_wsi.errors import ConfigError

LossName = Literal["ss+focal", "dice+ce"]
SSVariant = Literal["pixel", "reference"]

SS_C = 0.01     # stabiliser of the standardisation (Zhao et al. 2019)
SS_BETA = 0.1   # pixels with e > beta * max(e) are the "hard" ones the loss attends to


def _one_hot(target: Tensor, n_classes: int) -> Tensor:
    """(B, H, W) class indices -> (B, C, H, W) float one-hot."""
    if target.min() < 0 or target.max() >= n_classes:
        raise ConfigError(f"target labels must be in [0, {n_classes}); found {int(target.min())}..{int(target.max())}")
    return F.one_hot(target.long(), n_classes).permute(0, 3, 1, 2).to(torch.float32)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss, ``-(1 - p)^gamma * y * log p`` summed over classes, averaged over pixels."""
    log_p = F.log_softmax(logits.float(), dim=1)
    y = _one_hot(target, logits.shape[1])
    return (-(1.0 - log_p.exp()) ** gamma * y * log_p).sum(dim=1).mean()


def structural_similarity_loss(logits: Tensor, target: Tensor, variant: SSVariant = "pixel") -> Tensor:
    """Structural-similarity loss (Zhao et al. 2019).

    Per sample and class, the target ``y`` and the prediction ``p`` are standardised over the
    pixels, and ``e = |(y - mu_y + C)/(sigma_y + C) - (p - mu_p + C)/(sigma_p + C)|`` measures the
    local structural disagreement. Pixels with ``e > beta * max(e)`` are selected.

    - ``pixel`` (default, the fix): each selected pixel's cross-entropy term
      ``-y log p`` is weighted by its ``e``; the loss is the mean over selected pixels.
    - ``reference``: one scalar cross-entropy of the whole batch times the mean ``e`` of the
      selected pixels, as the reference code does.

    ``e`` is a weight, not a path for gradients (it is detached).
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    y = _one_hot(target, logits.shape[1])
    dims = (2, 3)

    def standardise(x: Tensor) -> Tensor:
        return (x - x.mean(dim=dims, keepdim=True) + SS_C) / (x.std(dim=dims, keepdim=True, unbiased=False) + SS_C)

    e = (standardise(y) - standardise(p)).abs().detach()
    selected = (e > SS_BETA * e.amax(dim=dims, keepdim=True)).to(e.dtype)
    n_selected = selected.sum().clamp_min(1.0)
    if variant == "reference":
        cross_entropy = F.nll_loss(log_p, target.long())
        return cross_entropy * (e * selected).sum() / n_selected
    if variant != "pixel":
        raise ConfigError(f"unknown structural-similarity variant {variant!r}; use 'pixel' or 'reference'")
    return (e * selected * (-y * log_p)).sum() / n_selected


class DistanceTargetLoss(nn.Module):
    """The ``distance`` target's loss: ``base`` on the first two channels (background, object)
    plus the mean squared error of the third, through a sigmoid, against the distance map.

    The target is a distance label (gsd_wsi/targets.distance_label): 0 background, ``1 + 254 d``
    on objects, so that it crops and augments like a class mask."""

    def __init__(self, base: SegmentationLoss, levels: int = 254) -> None:
        super().__init__()
        self.base, self.levels = base, levels

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        objects = (target > 0).long()
        distance = (target - 1).clamp(min=0).float() / self.levels
        return self.base(logits[:, :2], objects) + F.mse_loss(torch.sigmoid(logits[:, 2].float()), distance)


class SegmentationLoss(nn.Module):
    """The fine-tuning loss by name: ``ss+focal`` (weights 1 : 1) or ``dice+ce``."""

    def __init__(self, name: LossName = "ss+focal", ss_variant: SSVariant = "pixel", focal_gamma: float = 2.0) -> None:
        super().__init__()
        if name not in ("ss+focal", "dice+ce"):
            raise ConfigError(f"unknown loss {name!r}; use 'ss+focal' or 'dice+ce'")
        self.name, self.ss_variant, self.focal_gamma = name, ss_variant, focal_gamma
        if name == "dice+ce":
            from monai.losses import DiceCELoss

            self._dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits`` (B, C, H, W), ``target`` (B, H, W) class indices."""
        if self.name == "dice+ce":
            return self._dice_ce(logits.float(), target[:, None].long())
        return structural_similarity_loss(logits, target, self.ss_variant) + focal_loss(logits, target, self.focal_gamma)
