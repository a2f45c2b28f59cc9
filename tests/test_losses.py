"""Fine-tuning losses: hand cases, agreement with PyTorch/MONAI, no NaN where the reference has one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gsd_wsi.errors import ConfigError
from gsd_wsi.nn.losses import (DistanceTargetLoss, SegmentationLoss, focal_loss, masked_dice_ce,
                               structural_similarity_loss)
from gsd_wsi.targets import IGNORE


def _batch(seed: int = 0, n_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, n_classes, 16, 16, generator=generator)
    target = torch.randint(0, n_classes, (2, 16, 16), generator=generator)
    return logits, target


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    logits, target = _batch()
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))


def test_focal_by_hand() -> None:
    # One pixel, two classes, p(true class) = sigmoid(2 - 0) = 0.8808: -(1 - p)^2 log p
    logits = torch.tensor([[[[2.0]], [[0.0]]]])
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    p = 1 / (1 + math.exp(-2.0))
    assert focal_loss(logits, target).item() == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-5)


def test_no_nan_when_probabilities_underflow() -> None:
    """Logits so confident that softmax gives exactly 0 for the true class: log(softmax) is -inf."""
    logits = torch.zeros(1, 2, 8, 8)
    logits[:, 1] = 200.0
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :4] = 1
    assert torch.isinf(torch.log(torch.softmax(logits, 1))).any()  # what the reference computes
    for variant in ("pixel", "reference"):
        loss = structural_similarity_loss(logits, target, variant) + focal_loss(logits, target)
        assert torch.isfinite(loss)


def test_ss_loss_is_zero_for_a_perfect_prediction_and_positive_otherwise() -> None:
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3] = 1
    perfect = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 60.0 - 30.0
    assert structural_similarity_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = -perfect
    assert structural_similarity_loss(wrong, target).item() > 1.0


def test_ss_loss_by_hand_on_four_pixels() -> None:
    """Two classes, four pixels in a row; e, the selection and the weighted CE computed directly."""
    logits = torch.tensor([[[[1.0, 0.0, -1.0, 0.5]], [[0.0, 0.0, 0.0, 0.0]]]])
    target = torch.tensor([[[0, 0, 1, 1]]])
    log_p = F.log_softmax(logits, 1)
    p, y = log_p.exp(), F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    c = 0.01

    def std(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=(2, 3), keepdim=True) + c) / (x.std(dim=(2, 3), keepdim=True, unbiased=False) + c)

    e = (std(y) - std(p)).abs()
    keep = e > 0.1 * e.amax(dim=(2, 3), keepdim=True)
    want = (e * keep * -y * log_p).sum() / keep.sum()
    torch.testing.assert_close(structural_similarity_loss(logits, target), want)
    want_reference = F.nll_loss(log_p, target) * (e * keep).sum() / keep.sum()
    torch.testing.assert_close(structural_similarity_loss(logits, target, "reference"), want_reference)


def test_losses_train_a_pixel_classifier() -> None:
    """Gradient descent on each loss separates two colours (catches sign and detach errors)."""
    torch.manual_seed(0)
    image = torch.zeros(4, 1, 16, 16)
    target = torch.zeros(4, 16, 16, dtype=torch.long)
    image[:, :, :, 8:] = 1.0
    target[:, :, 8:] = 1
    for name in ("ss+focal", "dice+ce"):
        model = torch.nn.Conv2d(1, 2, 1)
        loss_fn = SegmentationLoss(name)  # type: ignore[arg-type]
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        first = loss_fn(model(image), target).item()
        for _ in range(100):
            optimizer.zero_grad()
            loss = loss_fn(model(image), target)
            loss.backward()
            optimizer.step()
        assert loss.item() < 0.3 * first, name
        assert (model(image).argmax(1) == target).all(), name


def test_dice_ce_matches_monai() -> None:
    from monai.losses import DiceCELoss

    logits, target = _batch(1)
    ours = SegmentationLoss("dice+ce")(logits, target)
    theirs = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target[:, None])
    torch.testing.assert_close(ours, theirs)


def test_bad_names_and_labels() -> None:
    with pytest.raises(ConfigError, match="unknown loss"):
        SegmentationLoss("l2")  # type: ignore[arg-type]
    logits, target = _batch()
    with pytest.raises(ConfigError, match="variant"):
        structural_similarity_loss(logits, target, "other")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="labels"):
        focal_loss(logits, target + 3)


@pytest.mark.parametrize("name", ["dice+ce", "ss+focal", "distance"])
def test_ignored_pixels_never_change_the_loss_or_its_gradient(name: str) -> None:
    """Pixels labelled IGNORE (outside every region of interest) may hold anything: loss and
    gradient elsewhere stay the same, and no gradient reaches them."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 24, 24)
    target = torch.randint(0, 255 if name == "distance" else 3, (2, 24, 24))
    target[:, :, :8] = IGNORE
    loss_fn = (DistanceTargetLoss(SegmentationLoss("dice+ce")) if name == "distance"
               else SegmentationLoss(name))  # type: ignore[arg-type]
    perturbed = logits.clone()
    perturbed[..., :8] += 10 * torch.randn_like(perturbed[..., :8])
    values, grads = [], []
    for start in (logits, perturbed):
        x = start.clone().requires_grad_()
        loss = loss_fn(x, target)
        loss.backward()
        values.append(loss.item())
        grads.append(x.grad)
    assert values[0] == pytest.approx(values[1], abs=1e-6)
    assert torch.allclose(grads[0][..., 8:], grads[1][..., 8:], atol=1e-7)
    assert grads[0][..., :8].abs().max() == 0


def test_masked_dice_ce_is_monai_dice_ce_when_nothing_is_ignored() -> None:
    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    assert masked_dice_ce(logits, target).item() == pytest.approx(SegmentationLoss("dice+ce")(logits, target).item(), abs=1e-6)
