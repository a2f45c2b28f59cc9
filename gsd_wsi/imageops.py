"""Small image operations shared by the leaf modules (Pillow-backed, no torch).

Resizing RGB images, and bringing images, label maps and predicted probabilities from one
resolution (um/px) to another, as `finetune --train-mpp` and `evaluate` do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image


def resize_rgb(rgb: np.ndarray, size_px: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 (H, W, 3) image to ``size_px`` = (width, height).

    Downsampling uses area averaging (Pillow's BOX filter, the equivalent of OpenCV's
    INTER_AREA), which neither aliases nor blurs; upsampling uses bicubic interpolation.
    """
    width, height = size_px
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    shrinking = width <= rgb.shape[1] and height <= rgb.shape[0]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), method))


# --- Resampling between resolutions (finetune's --train-mpp, evaluate) ---------------------

#: Resolutions closer than this (relative) are treated as the same: no resampling.
MPP_TOLERANCE = 0.02


def same_mpp(mpp_a: float, mpp_b: float) -> bool:
    """Whether two resolutions (um/px) agree within :data:`MPP_TOLERANCE`."""
    return abs(mpp_a / mpp_b - 1.0) <= MPP_TOLERANCE


def size_at_mpp(shape_hw: tuple[int, ...], from_mpp: float, to_mpp: float) -> tuple[int, int]:
    """(width, height) of an image of ``shape_hw`` pixels at ``from_mpp`` once brought to ``to_mpp``.

    The same field of view, rounded to whole pixels (1000 px at 0.25 um/px -> 500 px at 0.5).
    """
    scale = from_mpp / to_mpp
    return max(1, round(shape_hw[1] * scale)), max(1, round(shape_hw[0] * scale))


def resize_labels(labels: np.ndarray, size_px: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D label map (classes or instance ids) to ``size_px`` = (width, height), nearest.

    Every output pixel takes the label under its centre: no new values appear, so each
    instance keeps its id (a nucleus smaller than the new pixel pitch can vanish). Dtype kept.
    """
    width, height = size_px
    if labels.shape == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.intp), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.intp), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def resize_probabilities(probabilities: np.ndarray, size_px: tuple[int, int]) -> np.ndarray:
    """Resize (C, H, W) class probabilities to ``size_px`` = (width, height), bilinear per channel, float32.

    Bilinear weights sum to one, so the channels still sum to one at every pixel.
    """
    width, height = size_px
    if probabilities.shape[1:] == (height, width):
        return probabilities.astype(np.float32, copy=False)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))
                                .resize((width, height), Image.Resampling.BILINEAR)) for channel in probabilities])


def predict_at_mpp(predict: Callable[[np.ndarray], np.ndarray], rgb: np.ndarray, rgb_mpp: float | None,
                   predict_mpp: float | None) -> np.ndarray:
    """``predict(rgb)`` -> (C, H, W) probabilities, run at ``predict_mpp`` and returned at ``rgb``'s size.

    The image is resized (area averaging when shrinking) to ``predict_mpp``, predicted, and the
    probabilities resized back (bilinear). With either resolution unknown, or both the same
    within :data:`MPP_TOLERANCE`, this is exactly ``predict(rgb)``.
    """
    if rgb_mpp is None or predict_mpp is None or same_mpp(rgb_mpp, predict_mpp):
        return predict(rgb)
    probabilities = predict(resize_rgb(rgb, size_at_mpp(rgb.shape, rgb_mpp, predict_mpp)))
    return resize_probabilities(probabilities, (rgb.shape[1], rgb.shape[0]))
