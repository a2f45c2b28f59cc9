"""Sliding-window prediction: blending reconstructs a pointwise model exactly, at any size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsd_wsi.nn.inference import predict_probabilities, to_input


class Pointwise(torch.nn.Module):
    """A 1x1 convolution: its whole-image output is known, so blending errors show."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert (t == 0).all()  # segmentation runs at t = 0
        return self.conv(x)


@pytest.mark.parametrize("shape", [(96, 96), (100, 130), (40, 50)])
def test_blending_reconstructs_the_whole_image(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    model = Pointwise()
    got = predict_probabilities(model, image, patch_px=64, overlap=0.5)
    with torch.no_grad():
        want = torch.softmax(model(to_input(image), torch.zeros(1, dtype=torch.long)), 1)[0].numpy()
    assert got.shape == (4, *shape) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


def test_input_range() -> None:
    image = np.array([[[0, 255, 128]]], dtype=np.uint8)
    np.testing.assert_allclose(to_input(image)[0, :, 0, 0].numpy(), [-1.0, 1.0, 128 / 255 * 2 - 1], atol=1e-6)
    np.testing.assert_allclose(to_input(image, (0.0, 1.0))[0, :, 0, 0].numpy(), [0.0, 1.0, 128 / 255], atol=1e-6)
