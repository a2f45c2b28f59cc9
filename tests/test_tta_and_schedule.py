"""Test-time augmentation (the 8 flips and rotations), learning-rate schedules, bf16 choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gsd_wsi.errors import ConfigError
from gsd_wsi.nn.inference import dihedral_mean, predict_probabilities
from gsd_wsi.nn.precision import use_bf16
from gsd_wsi.train.lr_schedule import lr_factor


def test_dihedral_mean_of_an_equivariant_map_is_the_map() -> None:
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(dihedral_mean(lambda v: v * 2, x), x * 2)


def test_dihedral_mean_undoes_each_transform_before_averaging() -> None:
    """A map that is not equivariant: it adds a ramp fixed in the window's frame. Undone and
    averaged over the 8 views, the ramp becomes its dihedral symmetrisation, and the image
    part stays where it was (a transform not undone would move it)."""
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 1] = 8.0
    ramp = torch.arange(4.0).repeat(4, 1)[None, None]  # grows to the right
    out = dihedral_mean(lambda v: v + ramp, x)
    views = []
    for k in range(4):
        for mirrored in (False, True):
            r = ramp.flip(-1) if mirrored else ramp
            views.append(torch.rot90(r, -k, dims=(-2, -1)))
    expected = x + torch.stack(views).mean(0)
    torch.testing.assert_close(out, expected)
    assert out[0, 0, 0, 1] > 8.0 and torch.allclose(out - x, (out - x).transpose(-1, -2))


def test_dihedral_mean_refuses_rectangles() -> None:
    with pytest.raises(ValueError, match="square"):
        dihedral_mean(lambda v: v, torch.zeros(1, 1, 4, 6))


def test_tta_whole_image_prediction_is_rotation_invariant() -> None:
    """With TTA, predicting a rotated image gives the rotated prediction (up to blending)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    model = lambda x, t: conv(x)  # noqa: E731 (the network's call signature)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    plain = predict_probabilities(model, image, 32, overlap=0.0, tta=True)
    turned = predict_probabilities(model, np.rot90(image).copy(), 32, overlap=0.0, tta=True)
    np.testing.assert_allclose(np.rot90(plain, axes=(1, 2)), turned, atol=1e-5)
    no_tta = predict_probabilities(model, np.rot90(image).copy(), 32, overlap=0.0, tta=False)
    assert not np.allclose(np.rot90(plain, axes=(1, 2)), no_tta, atol=1e-3)


def test_lr_schedules() -> None:
    assert [lr_factor(s, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 100, "constant", 4) for s in (0, 1, 3, 4)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_factor(10, 110, "cosine", 10) == 1.0
    assert lr_factor(60, 110, "cosine", 10) == pytest.approx(0.5)
    assert lr_factor(35, 110, "cosine", 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, 110, "cosine", 10) == pytest.approx(0.0)
    assert lr_factor(500, 110, "cosine", 10) == pytest.approx(0.0)   # past the end: stays at 0
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(0, 10, "step")  # type: ignore[arg-type]


def test_finetune_config_refuses_bad_schedules() -> None:
    from gsd_wsi.train.finetune_config import FinetuneConfig

    with pytest.raises(ConfigError, match="--lr-schedule"):
        FinetuneConfig(lr_schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--warmup-steps"):
        FinetuneConfig(warmup_steps=-1)


def test_bf16_is_used_only_where_it_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import gsd_wsi.nn.precision as precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ())
    assert not use_bf16("auto", cpu) and use_bf16("auto", cuda) and use_bf16("bf16", cpu) and not use_bf16("fp32", cuda)
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ("amx_bf16",))
    assert use_bf16("auto", cpu)
    with pytest.raises(ConfigError, match="fp32"):
        use_bf16("fp16", cpu)
