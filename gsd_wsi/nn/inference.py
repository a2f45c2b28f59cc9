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


@torch.no_grad()
def predict_probabilities(model: Callable[[Tensor, Tensor], Tensor], image_uint8: np.ndarray, patch_px: int,
                          overlap: float = 0.5, input_range: InputRange = (-1.0, 1.0), batch_size: int = 4,
                          device: torch.device | str = "cpu", target: str = "semantic") -> np.ndarray:
    """Class probabilities (C, H, W) float32 of a whole image (:func:`output_probabilities` of ``target``)."""
    x = to_input(image_uint8, input_range).to(device)

    def predictor(windows: Tensor) -> Tensor:
        t = torch.zeros(windows.shape[0], dtype=torch.long, device=windows.device)
        return output_probabilities(model(windows, t), target)

    probabilities = sliding_window_inference(
        x, roi_size=(patch_px, patch_px), sw_batch_size=batch_size, predictor=predictor, overlap=overlap,
        mode="gaussian", padding_mode="reflect",
    )
    return probabilities[0].cpu().numpy().astype(np.float32)
