"""Segmentation losses for fine-tuning (docs/method.md section 3).

``ss+focal`` (the method's): structural-similarity loss plus focal loss, weights 1 : 1.
``dice+ce``: MONAI's DiceCELoss, the common baseline.

All logarithms come from ``log_softmax``, never ``log(softmax)``: the reference takes the log
of probabilities that can underflow to 0 and then produces NaN.

Pixels labelled :data:`gsd_wsi.targets.IGNORE` (-1; outside the regions of interest of an
annotated slide) are left out of every loss: the cross-entropy and focal terms average over
the other pixels, the Dice and structural-similarity statistics are taken over them alone, so
what lies under an ignored pixel never changes the loss or its gradient. A batch without
ignored pixels takes exactly the unmasked path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsd_wsi.errors import ConfigError
from gsd_wsi.targets import IGNORE

LossName = Literal["ss+focal", "dice+ce"]
SSVariant = Literal["pixel", "reference"]

SS_C = 0.01     # stabiliser of the standardisation (Zhao et al. 2019)
SS_BETA = 0.1   # pixels with e > beta * max(e) are the "hard" ones the loss attends to
DICE_SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr, so the masked Dice matches it


def _one_hot(target: Tensor, n_classes: int) -> Tensor:
    """(B, H, W) class indices -> (B, C, H, W) float one-hot."""
    if target.min() < 0 or target.max() >= n_classes:
        raise ConfigError(f"target labels must be in [0, {n_classes}); found {int(target.min())}..{int(target.max())}")
    return F.one_hot(target.long(), n_classes).permute(0, 3, 1, 2).to(torch.float32)


def _labelled(target: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(target with ignored pixels as class 0, (B, 1, H, W) float mask of labelled pixels)``;
    the mask is None when no pixel is ignored."""
    ignored = target == IGNORE
    if not bool(ignored.any()):
        return target, None
    return target.masked_fill(ignored, 0), (~ignored)[:, None].to(torch.float32)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of (B, 1, H, W) ``values`` over the labelled pixels (0 when there are none)."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss, ``-(1 - p)^gamma * y * log p`` summed over classes, averaged over labelled pixels."""
    target, mask = _labelled(target)
    log_p = F.log_softmax(logits.float(), dim=1)
    y = _one_hot(target, logits.shape[1])
    return _masked_mean((-(1.0 - log_p.exp()) ** gamma * y * log_p).sum(dim=1, keepdim=True), mask)


def masked_dice_ce(logits: Tensor, target: Tensor) -> Tensor:
    """MONAI's DiceCELoss (softmax, one-hot, background included, per sample and class, means)
    over the labelled pixels only: cross-entropy averaged over them, Dice sums taken over them."""
    target, mask = _labelled(target)
    logits = logits.float()
    if mask is None:
        mask = torch.ones_like(logits[:, :1])
    p = torch.softmax(logits, dim=1) * mask
    y = _one_hot(target, logits.shape[1]) * mask
    dims = (2, 3)
    dice = 1.0 - (2.0 * (p * y).sum(dims) + DICE_SMOOTH) / (p.sum(dims) + y.sum(dims) + DICE_SMOOTH)
    cross_entropy = _masked_mean(-(y * F.log_softmax(logits, dim=1)).sum(dim=1, keepdim=True), mask)
    return dice.mean() + cross_entropy


def structural_similarity_loss(logits: Tensor, target: Tensor, variant: SSVariant = "pixel") -> Tensor:
    """Structural-similarity loss (Zhao et al. 2019).

    Per sample and class, the target ``y`` and the prediction ``p`` are standardised over the
    pixels, and ``e = |(y - mu_y + C)/(sigma_y + C) - (p - mu_p + C)/(sigma_p + C)|`` measures the
    local structural disagreement. Pixels with ``e > beta * max(e)`` are selected.

    - ``pixel`` (default, the fix): each selected pixel's cross-entropy term
      ``-y log p`` is weighted by its ``e``; the loss is the mean over selected pixels.
    - ``reference``: one scalar cross-entropy of the whole batch times the mean ``e`` of the
      selected pixels, as the reference code does.

    ``e`` is a weight, not a path for gradients (it is detached). Ignored pixels take no part in
    the means, deviations and selection.
    """
    target, mask = _labelled(target)
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    y = _one_hot(target, logits.shape[1])
    dims = (2, 3)
    weight = torch.ones_like(p[:, :1]) if mask is None else mask
    count = weight.sum(dim=dims, keepdim=True).clamp_min(1.0)

    def standardise(x: Tensor) -> Tensor:
        if mask is None:
            return (x - x.mean(dim=dims, keepdim=True) + SS_C) / (x.std(dim=dims, keepdim=True, unbiased=False) + SS_C)
        mean = (x * weight).sum(dim=dims, keepdim=True) / count
        std = (((x - mean) ** 2) * weight).sum(dim=dims, keepdim=True).div(count).sqrt()
        return (x - mean + SS_C) / (std + SS_C)

    e = ((standardise(y) - standardise(p)).abs() * weight).detach()
    selected = (e > SS_BETA * e.amax(dim=dims, keepdim=True)).to(e.dtype) * weight
    n_selected = selected.sum().clamp_min(1.0)
    if variant == "reference":
        cross_entropy = F.nll_loss(log_p, target.long(), reduction="none")[:, None]
        cross_entropy = _masked_mean(cross_entropy, mask)
        return cross_entropy * (e * selected).sum() / n_selected
    if variant != "pixel":
        raise ConfigError(f"unknown structural-similarity variant {variant!r}; use 'pixel' or 'reference'")
    return (e * selected * (-y * log_p)).sum() / n_selected


class DistanceTargetLoss(nn.Module):
    """The ``distance`` target's loss: ``base`` on the first two channels (background, object)
    plus the mean squared error of the third, through a sigmoid, against the distance map.

    The target is a distance label (gsd_wsi/targets.distance_label): 0 background, ``1 + 254 d``
    on objects, so that it crops and augments like a class mask; ``IGNORE`` pixels are left out."""

    def __init__(self, base: SegmentationLoss, levels: int = 254) -> None:
        super().__init__()
        self.base, self.levels = base, levels

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        ignored = target == IGNORE
        objects = (target > 0).long().masked_fill(ignored, IGNORE)
        distance = (target - 1).clamp(min=0).float() / self.levels
        squared = (torch.sigmoid(logits[:, 2].float()) - distance) ** 2
        mask = (~ignored)[:, None].to(torch.float32) if bool(ignored.any()) else None
        return self.base(logits[:, :2], objects) + _masked_mean(squared[:, None], mask)


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
            if bool((target == IGNORE).any()):
                return masked_dice_ce(logits, target)
            return self._dice_ce(logits.float(), target[:, None].long())
        return structural_similarity_loss(logits, target, self.ss_variant) + focal_loss(logits, target, self.focal_gamma)
