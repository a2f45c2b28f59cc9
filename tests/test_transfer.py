"""A pretraining run becomes a segmentation U-Net: body loaded, head new, mismatches refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gsd_wsi.errors import ConfigError
from gsd_wsi.nn.unet import unet_config
from gsd_wsi.train.checkpoint import load_weights
from gsd_wsi.train.transfer import segmentation_unet


def test_body_loaded_head_reinitialised(pretrained_run: Path) -> None:
    model, record = segmentation_unet(pretrained_run, 3, unet_config("tiny"), patch_px=32)
    pretrained = load_weights(pretrained_run / "model")
    state = model.state_dict()
    body = [k for k in pretrained if not k.startswith("final_conv.")]
    assert body and all(torch.equal(state[k], pretrained[k]) for k in body)
    assert record["reinitialised"] and all(k.startswith("final_conv.") for k in record["reinitialised"])
    assert state["final_conv.1.weight"].shape[0] == 3  # the new 1x1 conv has one output per class
    logits = model(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    assert logits.shape == (1, 3, 32, 32)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen


def test_mismatches_are_refused(pretrained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="another architecture.*--model tiny"):
        segmentation_unet(pretrained_run, 2, unet_config("small"), patch_px=32)
    with pytest.raises(ConfigError, match="--patch-px 32"):
        segmentation_unet(pretrained_run, 2, unet_config("tiny"), patch_px=64)
    with pytest.raises(ConfigError, match="not a pretraining run"):
        segmentation_unet(tmp_path, 2, unet_config("tiny"), patch_px=32)
    with pytest.raises(ConfigError, match="at least 2"):
        segmentation_unet(None, 1, unet_config("tiny"), patch_px=32)


def test_from_scratch(pretrained_run: Path) -> None:
    model, record = segmentation_unet(None, 2, unet_config("tiny"), patch_px=32)
    assert record == {"pretrained": None} and model.config.out_channels == 2


def test_segmentation_model_round_trip(tmp_path: Path) -> None:
    from gsd_wsi.train.checkpoint import save_checkpoint
    from gsd_wsi.train.transfer import load_segmentation_network, segmentation_model_json

    model, _ = segmentation_unet(None, 2, unet_config("tiny"), patch_px=32)
    info = segmentation_model_json(model, ["background", "nucleus"], 32, 0.25, (-1.0, 1.0), {"method": "none"}, {})
    save_checkpoint(tmp_path / "run" / "model", model.state_dict(), None, info, None)
    loaded, got = load_segmentation_network(tmp_path / "run")
    assert got["classes"] == ["background", "nucleus"] and got["mpp"] == 0.25 and got["patch_px"] == 32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    with pytest.raises(ConfigError, match="class names"):
        segmentation_model_json(model, ["only one"], 32, None, (-1.0, 1.0), {"method": "none"}, {})
