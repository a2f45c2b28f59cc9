"""How long training will take on a CPU, measured before it starts, so a slow run is never silent.

The base U-Net trains at about 0.3 img/s at 256 px on a CPU: a from-scratch fine-tuning run
that does not ask for a smaller network could take hours without a word. One timed
forward + backward pass, outside training, turns that into a number in the log.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from gsd_wsi.nn.unet import UNET_PRESETS, UNet, UNetConfig

logger = logging.getLogger(__name__)

#: Estimates above this many seconds are logged as warnings, shorter ones as information.
WARN_AFTER_S = 60.0


def preset_name(config: UNetConfig) -> str:
    """The preset (``base``, ``small``, ``tiny``) whose architecture ``config`` has, or ``custom``."""
    for name, preset in UNET_PRESETS.items():
        if dataclasses.replace(config, out_channels=preset.out_channels, init=preset.init,
                               use_top_skip=preset.use_top_skip) == preset:
            return name
    return "custom"


#: Time the whole batch when the two-image estimate is below this many seconds.
_FULL_BATCH_BELOW_S = 2.0


def seconds_per_step(model: UNet, batch_size: int, patch_px: int, device: torch.device) -> float:
    """Wall seconds of one forward + backward pass over ``batch_size`` crops of ``patch_px``.

    A warm-up pass of one image, then one timed pass of up to two images, scaled to the batch.
    Where that estimate is cheap (under ``_FULL_BATCH_BELOW_S``), the whole batch is timed
    instead: a small network's cost per image falls with the batch (2 images overestimated a
    tiny U-Net's batch of 16 by 2.5x), while a large one's grows about linearly and is too
    slow to time whole. The weights are untouched, the gradients cleared, and no global
    random state is drawn, so the training that follows is the same run.
    """
    generator = torch.Generator().manual_seed(0)
    was_training = model.training
    model.train()

    def timed_pass(n: int) -> float:
        x = torch.rand(n, model.config.in_channels, patch_px, patch_px, generator=generator).to(device)
        t = torch.zeros(n, dtype=torch.long, device=device)
        started = time.perf_counter()
        model(x, t).float().square().mean().backward()
        return time.perf_counter() - started

    try:
        timed_pass(1)  # warm-up
        few = min(batch_size, 2)
        estimate = timed_pass(few) * batch_size / few
        if few < batch_size and estimate < _FULL_BATCH_BELOW_S:
            estimate = timed_pass(batch_size)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return estimate


def log_cpu_training_time(model: UNet, batch_size: int, patch_px: int, steps: int, device: torch.device,
                          warn_after_s: float = WARN_AFTER_S) -> None:
    """On a CPU, log the network trained, its size and the expected time of ``steps`` steps.

    A warning when the estimate exceeds ``warn_after_s`` seconds (with a smaller network
    suggested), information otherwise; nothing on a GPU.
    """
    if device.type != "cpu":
        return
    name = preset_name(model.config)
    n_params = sum(p.numel() for p in model.parameters())
    per_step_s = seconds_per_step(model, batch_size, patch_px, device)
    total_s = per_step_s * steps
    message = (f"training the {name} U-Net ({n_params:,} parameters) on the CPU: about {per_step_s:.3g} s a step "
               f"of {batch_size} x {patch_px} px, so {steps} steps take about {total_s:,.0f} s "
               f"({total_s / 60:,.1f} min), data loading not included")
    if total_s <= warn_after_s:
        logger.info("%s", message)
        return
    smaller = {"tiny": None, "small": "--model tiny"}.get(name, "--model tiny or --model small")
    logger.warning("%s%s", message, f"; a smaller network ({smaller}) trains much faster on a CPU" if smaller else "")
