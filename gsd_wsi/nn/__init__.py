"""Networks and the noise schedule (docs/method.md sections 1-2).

:class:`UNet` is the one network of GenSelfDiff-HIS, pretrained as an eps-predicting diffusion
model and fine-tuned as a segmenter; :class:`NoiseSchedule` owns the diffusion maths apart from it.
"""

from __future__ import annotations

from gsd_wsi.nn.schedule import SCHEDULE_KINDS, NoiseSchedule, ScheduleConfig, beta_schedule
from gsd_wsi.nn.unet import UNET_PRESETS, UNet, UNetConfig, unet_config

__all__ = [
    "SCHEDULE_KINDS",
    "UNET_PRESETS",
    "NoiseSchedule",
    "ScheduleConfig",
    "UNet",
    "UNetConfig",
    "beta_schedule",
    "unet_config",
]
