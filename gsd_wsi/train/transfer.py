"""From a pretraining run to a segmentation U-Net (docs/method.md section 3).

The same network with ``out_channels = n_classes``: every pretrained weight is loaded except
the head (the time-free ResBlock and the 1x1 convolution), which is re-initialised. Nothing
is frozen. A run of another architecture or patch size is refused with a message, never
loaded partially by accident.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from gsd_wsi.errors import ConfigError
from gsd_wsi.nn.unet import UNet, UNetConfig
from gsd_wsi.train import checkpoint as ckpt
from gsd_wsi.zoo import builtin_or_path

logger = logging.getLogger(__name__)


def pretrained_folder(path: Path, mpp: float | None = None) -> Path:
    """The checkpoint folder of ``path``: a pretraining run (its ``model/``), a checkpoint itself,
    or a built-in model by name (a family's member for images at ``mpp``, gsd_wsi/zoo)."""
    path = builtin_or_path(path, mpp)
    if (path / ckpt.MODEL_JSON).is_file():
        return path
    if (path / "model" / ckpt.MODEL_JSON).is_file():
        return path / "model"
    raise ConfigError(f"{path}: not a pretraining run or checkpoint (no model.json); give the folder "
                      f"`gsd-wsi pretrain -o` wrote, or --pretrained none to train from scratch")


def pretrained_unet_config(pretrained: Path) -> UNetConfig:
    """The architecture of a pretraining run (or checkpoint)."""
    return UNetConfig.from_dict(ckpt.load_model_json(pretrained_folder(pretrained))["model"])


def segmentation_unet(pretrained: Path | None, n_classes: int, base_config: UNetConfig,
                      patch_px: int) -> tuple[UNet, dict[str, Any]]:
    """The segmentation U-Net and a record of where its weights came from.

    ``base_config`` is the architecture asked for (ignored for its ``out_channels``); with a
    pretrained run it must match the run's, and ``patch_px`` must equal the size it was
    pretrained at.
    """
    if n_classes < 2:
        raise ConfigError(f"--classes must be at least 2 (background and one class); got {n_classes}")
    wanted = dataclasses.replace(base_config, out_channels=n_classes)
    if pretrained is None:
        return UNet(wanted), {"pretrained": None}
    folder = pretrained_folder(pretrained)
    info = ckpt.load_model_json(folder)
    trained = UNetConfig.from_dict(info["model"])
    differences = {k: (getattr(trained, k), getattr(wanted, k)) for k in ("dim", "dim_mults", "in_channels",
                   "init_dim", "attn_heads", "attn_dim_head", "resnet_groups", "use_top_skip")
                   if getattr(trained, k) != getattr(wanted, k)}
    if differences:
        listed = "; ".join(f"{k}: pretrained {a!r}, asked {b!r}" for k, (a, b) in differences.items())
        raise ConfigError(f"{folder}: the pretrained U-Net has another architecture ({listed}); use the "
                          f"run's model size (--model {info.get('preset', '?')}) or pretrain anew")
    if info.get("image_size") not in (None, patch_px):
        raise ConfigError(f"{folder}: pretrained on {info['image_size']}-px patches, but fine-tuning asks for "
                          f"{patch_px} px; use --patch-px {info['image_size']}")
    model = UNet(dataclasses.replace(trained, out_channels=n_classes, init=wanted.init))
    # A fine-tuned model with as many outputs (a built-in nuclei model, fine-tuned further on a
    # lab's own nuclei) keeps its head: it already does the job, and the labels refine it.
    keep_head = info.get("kind") == SEGMENTATION_KIND and trained.out_channels == n_classes
    state = {k: v for k, v in ckpt.load_weights(folder, ema=True).items()
             if keep_head or not k.startswith(UNet.HEAD_PREFIXES)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = set(model.head_parameter_names()) | {k for k in model.state_dict() if k.startswith(UNet.HEAD_PREFIXES)}
    if unexpected or set(missing) - head:
        raise ConfigError(f"{folder}: weights do not fit the U-Net (missing {sorted(set(missing) - head)[:5]}, "
                          f"unexpected {unexpected[:5]}); the checkpoint is damaged or of another version")
    logger.info("loaded %d pretrained tensors from %s; %s", len(state), folder,
                "kept its head" if keep_head else f"re-initialised the head ({len(missing)} tensors)")
    return model, {"pretrained": str(folder), "pretrained_step": info.get("step"), "loaded_tensors": len(state),
                   "reinitialised": sorted(missing), "builtin": (info.get("builtin") or {}).get("name")}


#: ``model.json["kind"]`` of a fine-tuned segmentation network.
SEGMENTATION_KIND = "gsd-wsi segmentation U-Net"


def segmentation_model_json(model: UNet, class_names: list[str], patch_px: int, mpp: float | None,
                            input_range: tuple[float, float], stain: dict[str, Any], extra: dict[str, Any],
                            data_mpp: float | None = None) -> dict:
    """What `evaluate` and `segment` need to reproduce the preprocessing without flags.

    ``mpp`` is the resolution the network works at; ``data_mpp`` that of the images it was
    trained from (they differ after `finetune --train-mpp`), `evaluate`'s default for its images.
    """
    if len(class_names) != model.config.out_channels:
        raise ConfigError(f"{len(class_names)} class names for a {model.config.out_channels}-class network")
    return {"kind": SEGMENTATION_KIND, "model": model.config.to_dict(), "classes": list(class_names),
            "patch_px": patch_px, "mpp": mpp, "data_mpp": data_mpp, "input_range": list(input_range),
            "stain": stain} | extra


def load_segmentation_network(path: Path) -> tuple[UNet, dict[str, Any]]:
    """A fine-tuned network (and its model.json) from its run folder (``RUN/model``) or checkpoint folder, in eval mode."""
    path = Path(path)
    folder = path if (path / ckpt.MODEL_JSON).is_file() else path / "model"
    info = ckpt.load_model_json(folder)
    if info.get("kind") != SEGMENTATION_KIND:
        raise ConfigError(f"{folder}: not a fine-tuned segmentation model (kind {info.get('kind')!r}); "
                          f"give the folder `gsd-wsi finetune -o` wrote")
    model = UNet(UNetConfig.from_dict(info["model"]))
    model.load_state_dict(ckpt.load_weights(folder, ema=False))
    return model.eval(), info
