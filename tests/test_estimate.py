"""The CPU training-time estimate: names the network and its size, says seconds, changes nothing."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gsd_wsi.nn.unet import UNET_PRESETS, UNet, unet_config
from gsd_wsi.stages.finetune import FinetuneConfig, run_finetune
from gsd_wsi.train.estimate import log_cpu_training_time, preset_name, seconds_per_step

CPU = torch.device("cpu")


def _tiny() -> UNet:
    torch.manual_seed(0)
    return UNet(dataclasses.replace(unet_config("tiny", init="pytorch"), out_channels=2))


def _estimates(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gsd_wsi.train.estimate"]


@pytest.mark.parametrize("name", list(UNET_PRESETS))
def test_preset_name_ignores_the_head_and_the_init(name: str) -> None:
    config = unet_config(name, out_channels=5, init="pytorch", use_top_skip=True)
    assert preset_name(config) == name
    assert preset_name(unet_config("tiny", dim=24)) == "custom"


def test_timing_leaves_weights_gradients_and_random_state_alone() -> None:
    model = _tiny().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert seconds_per_step(model, 4, 32, CPU) > 0
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_a_long_run_warns_with_the_network_its_size_and_seconds(caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny()
    n_params = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.INFO, logger="gsd_wsi"):
        log_cpu_training_time(model, 4, 32, 1000, CPU, warn_after_s=0)
    (record,) = _estimates(caplog)
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert f"tiny U-Net ({n_params:,} parameters)" in message
    per_step, total = (float(v.replace(",", "")) for v in
                       re.search(r"about ([\d.,]+) s a step .* about ([\d.,]+) s \(", message).groups())
    assert per_step > 0 and total == pytest.approx(1000 * per_step, rel=0.02, abs=1)
    assert "1000 steps" in message and "--model" not in message  # already the smallest network


def test_a_short_run_is_information_and_a_gpu_run_is_not_timed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gsd_wsi"):
        log_cpu_training_time(_tiny(), 2, 32, 1, CPU, warn_after_s=1e9)
        log_cpu_training_time(_tiny(), 2, 32, 1, torch.device("cuda"))  # returns before touching the device
    (record,) = _estimates(caplog)
    assert record.levelno == logging.INFO and " s a step" in record.getMessage()


def test_a_bigger_network_is_told_of_the_smaller_ones(caplog: pytest.LogCaptureFixture) -> None:
    model = UNet(unet_config("small", out_channels=2, init="pytorch"))
    with caplog.at_level(logging.INFO, logger="gsd_wsi"):
        log_cpu_training_time(model, 1, 16, 10, CPU, warn_after_s=0)
    (record,) = _estimates(caplog)
    assert "small U-Net" in record.getMessage() and "--model tiny" in record.getMessage()


def test_finetune_logs_the_estimate_before_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        label = (rng.random((48, 48)) > 0.5).astype(np.uint8)
        image = np.where(label[..., None] > 0, [90, 40, 120], [230, 160, 200]).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"im{i}.png")
        Image.fromarray(label).save(tmp_path / "data" / "masks" / f"im{i}.png")
    config = FinetuneConfig(model="tiny", epochs=2, batch_size=2, patch_px=32, crops_per_image=2, val_fraction=0.34,
                            device="cpu")
    with caplog.at_level(logging.INFO, logger="gsd_wsi"):
        run_finetune(tmp_path / "data", tmp_path / "run", config, None)
    (record,) = _estimates(caplog)
    assert "tiny U-Net" in record.getMessage() and "4 steps" in record.getMessage()
