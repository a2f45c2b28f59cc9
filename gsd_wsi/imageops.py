"""Small image operations shared by the leaf modules (Pillow-backed, no torch)."""

from __future__ import annotations

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
