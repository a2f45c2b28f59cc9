"""Whole-image prediction by sliding window with weighted blending (docs/method.md section 4).

Images are predicted whole, never as isolated patches: overlapping windows are blended
with Gaussian weights, and the sum is divided by the sum of the weights (MONAI's
``sliding_window_inference``, which does exactly that). The network sees t = 0 and the
input range it was trained with.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor

InputRange = tuple[float, float]


def to_input(image_uint8: np.ndarray, input_range: InputRange = (-1.0, 1.0)) -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in ``input_range``."""
    low, high = input_range
    x = torch.tensor(np.asarray(image_uint8)).permute(2, 0, 1)[None].float() / 255.0  # a copy: inputs may be read-only
    return x * (high - low) + low


def output_probabilities(logits: Tensor, target: str = "semantic") -> Tensor:
    """The network's outputs as probabilities: a softmax over the classes, except for the
    ``distance`` target, whose first two channels (background, object) are softmaxed and
    whose third, the regressed distance map, goes through a sigmoid."""
    logits = logits.float()
    if target == "distance":
        return torch.cat([torch.softmax(logits[:, :2], dim=1), torch.sigmoid(logits[:, 2:3])], dim=1)
    return torch.softmax(logits, dim=1)


DIHEDRAL_TRANSFORMS = 8  # the four 90-degree rotations, each also mirrored


def dihedral_mean(predict: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Test-time augmentation: the mean of ``predict`` over the 8 flips and 90-degree rotations of
    the square windows ``x`` (N, C, H, W), each output turned back before it is averaged.

    ``predict`` must return per-pixel maps (N, K, H, W) that move with the image (probabilities,
    a distance map); the mean is taken of those, not of logits.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"test-time rotations need square windows; got {tuple(x.shape[-2:])}")
    total: Tensor | None = None
    for quarter_turns in range(4):
        for mirrored in (False, True):
            view = torch.rot90(x, quarter_turns, dims=(-2, -1))
            view = view.flip(-1) if mirrored else view
            out = predict(view)
            out = out.flip(-1) if mirrored else out
            out = torch.rot90(out, -quarter_turns, dims=(-2, -1))
            total = out if total is None else total + out
    assert total is not None
    return total / DIHEDRAL_TRANSFORMS


@torch.no_grad()
def predict_probabilities(model: Callable[[Tensor, Tensor], Tensor], image_uint8: np.ndarray, patch_px: int,
                          overlap: float = 0.5, input_range: InputRange = (-1.0, 1.0), batch_size: int = 4,
                          device: torch.device | str = "cpu", target: str = "semantic",
                          tta: bool = False) -> np.ndarray:
    """Class probabilities (C, H, W) float32 of a whole image (:func:`output_probabilities` of ``target``);
    with ``tta`` each window's are the mean over its 8 flips and rotations (:func:`dihedral_mean`)."""
    x = to_input(image_uint8, input_range).to(device)

    def network(windows: Tensor) -> Tensor:
        t = torch.zeros(windows.shape[0], dtype=torch.long, device=windows.device)
        return output_probabilities(model(windows, t), target)

    def predictor(windows: Tensor) -> Tensor:
        return dihedral_mean(network, windows) if tta else network(windows)

    probabilities = sliding_window_inference(
        x, roi_size=(patch_px, patch_px), sw_batch_size=batch_size, predictor=predictor, overlap=overlap,
        mode="gaussian", padding_mode="reflect",
    )
    return probabilities[0].cpu().numpy().astype(np.float32)
