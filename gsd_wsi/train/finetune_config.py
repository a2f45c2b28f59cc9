"""Settings of `gsd-wsi finetune` (docs/method.md section 3), validated once, saved with the run.

Defaults are the method's faithful values (SS + focal loss, Adam 1e-4 with betas (0.5, 0.999),
150 epochs, semantic target); the fixes and extensions are options: PyTorch's init, input
range [-1, 1], the instance targets (``contour``, ``distance``), a slower or frozen pretrained
body, the full-resolution skip.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gsd_wsi.errors import ConfigError
from gsd_wsi.imageops import same_mpp
from gsd_wsi.stain import check_stain_options
from gsd_wsi.train.lr_schedule import LR_SCHEDULES
from gsd_wsi.targets import boundary_px_at

INPUT_RANGES = {"minus_one_one": (-1.0, 1.0), "zero_one": (0.0, 1.0)}
DATA_MPP_SPREAD = 0.05  # resolutions recorded by the images that one median may stand for
TARGETS = ("semantic", "contour", "distance")
# The contour target's boundary band: 2 um = 8 px at MoNuSeg's 40x (0.25 um/px). A published
# ablation of a contour U-Net on 40x nuclei moved AJI from 0.49 to 0.62 as the band widened from
# 1 to 8 px, so the widest band tested is the default; a nucleus thinner than the band keeps its
# innermost pixels as interior (gsd_wsi/targets.py), so narrow nuclei are not lost as seeds.
BOUNDARY_UM = 2.0


@dataclass(frozen=True)
class FinetuneConfig:
    classes: int = 2
    class_names: tuple[str, ...] | None = None     # default: background, class_1, ...
    model: Literal["tiny", "small", "base"] | None = None  # None: the pretrained run's, or base from scratch
    init: Literal["reference", "pytorch"] = "pytorch"
    label_fraction: float = 1.0
    epochs: int = 150
    batch_size: int = 8
    patch_px: int = 256
    crops_per_image: int = 8                        # random crops of each training image per epoch
    val_fraction: float = 0.2
    loss: Literal["ss+focal", "dice+ce"] = "ss+focal"
    ss_variant: Literal["pixel", "reference"] = "pixel"
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"  # constant is the method's; cosine decays to 0
    warmup_steps: int = 0                           # linear warm-up of the learning rate
    adam_beta1: float = 0.5
    adam_beta2: float = 0.999
    input_range: Literal["minus_one_one", "zero_one"] = "minus_one_one"   # zero_one is the reference's
    mpp: float | None = None                        # resolution of the training images (um/px)
    train_mpp: float | None = None                  # train at this resolution (the model's mpp); None: at mpp
    stain: str = "none"                             # normalise every image (fitted per image) to a target
    stain_target: Path | None = None                # image to take the target stains from; None: built-in
    split_file: Path | None = None                  # test never trains; train and val lists, where given, are kept
    seed: int = 0
    num_workers: int = 0
    val_every: int = 1                              # epochs
    device: Literal["auto", "cpu", "cuda"] = "auto"
    target: Literal["semantic", "contour", "distance"] = "semantic"
    boundary_um: float = BOUNDARY_UM                # width of the contour target's boundary band
    use_top_skip: bool | None = None                # None: the pretrained run's; False from scratch
    body_lr_scale: float = 1.0                      # the pretrained body's learning rate is lr x this
    freeze_body_epochs: int = 0                     # train the new head alone for this many epochs first
    roi_class: str = "Region*"                      # annotated slides: class of the exhaustively labelled areas
    ignore_class: str = "Ignore*"                   # annotated slides: class of the areas left out

    def __post_init__(self) -> None:
        if self.classes < 2:
            raise ConfigError(f"--classes must be at least 2 (background and one class); got {self.classes}")
        if self.class_names is not None and len(self.class_names) != self.classes:
            raise ConfigError(f"{len(self.class_names)} class names for --classes {self.classes}")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"--label-fraction must be in (0, 1]; got {self.label_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1); got {self.val_fraction}")
        for name in ("epochs", "batch_size", "crops_per_image", "val_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be at least 0; got {self.warmup_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive learning rate; got {self.lr}")
        if self.patch_px % 16:
            raise ConfigError(f"--patch-px must be a multiple of 16; got {self.patch_px}")
        for flag, value in (("--mpp", self.mpp), ("--train-mpp", self.train_mpp)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a positive resolution in um/px; got {value}")
        if self.mpp is not None and self.train_mpp is not None and self.train_mpp < self.mpp \
                and not same_mpp(self.train_mpp, self.mpp):
            raise ConfigError(f"--train-mpp {self.train_mpp} is finer than the training images ({self.mpp} um/px): "
                              f"that would upsample them; train at {self.mpp} um/px or coarser")
        check_stain_options(self.stain, self.stain_target)
        if self.input_range not in INPUT_RANGES:
            raise ConfigError(f"--input-range must be one of {', '.join(INPUT_RANGES)}; got {self.input_range!r}")
        if self.target not in TARGETS:
            raise ConfigError(f"--target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        if self.target != "semantic" and self.classes != 2:
            raise ConfigError(f"--target {self.target} learns the instances of one object class; it needs "
                              f"--classes 2 (background and the object), got {self.classes}")
        if not (math.isfinite(self.boundary_um) and self.boundary_um > 0):
            raise ConfigError(f"--boundary-um must be a positive width in micrometres; got {self.boundary_um}")
        if not (math.isfinite(self.body_lr_scale) and 0 < self.body_lr_scale <= 1):
            raise ConfigError(f"--body-lr-scale must be in (0, 1] (the body's learning rate as a fraction of "
                              f"--lr); got {self.body_lr_scale}")
        if not self.roi_class or not self.ignore_class or self.roi_class == self.ignore_class:
            raise ConfigError(f"--roi-class {self.roi_class!r} and --ignore-class {self.ignore_class!r} must be two "
                              "different, non-empty class names")
        if not 0 <= self.freeze_body_epochs < self.epochs:
            raise ConfigError(f"--freeze-body-epochs must be in [0, --epochs {self.epochs}); got {self.freeze_body_epochs}")

    @property
    def model_mpp(self) -> float | None:
        """The resolution the network sees: ``train_mpp``, else the images' own."""
        return self.train_mpp if self.train_mpp is not None else self.mpp

    @property
    def out_classes(self) -> int:
        """The network's outputs: ``classes``, or 3 for an instance target (contour: the object split
        in interior and boundary; distance: background, object and the distance map)."""
        return self.classes if self.target == "semantic" else 3

    @property
    def names(self) -> list[str]:
        """The network's output names: the data's classes, then ``boundary`` (contour) or ``distance``."""
        names = list(self.class_names) if self.class_names else ["background", *(f"class_{i}" for i in range(1, self.classes))]
        return names if self.target == "semantic" else [*names, "boundary" if self.target == "contour" else "distance"]

    @property
    def boundary_px(self) -> float:
        """The contour band in pixels at the model's resolution (needs ``mpp``)."""
        if self.model_mpp is None:
            raise ConfigError(f"--target contour needs the images' resolution to turn --boundary-um {self.boundary_um} "
                              "into pixels; give --mpp")
        return boundary_px_at(self.boundary_um, self.model_mpp)

    @property
    def target_record(self) -> dict[str, Any]:
        """model.json ``"target"``."""
        if self.target == "semantic":
            return {"kind": "semantic"}
        if self.target == "distance":
            return {"kind": "distance", "distance": "per instance, to its edge over its largest, in [0, 1]"}
        return {"kind": self.target, "boundary_um": self.boundary_um, "boundary_px": self.boundary_px}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("split_file", "stain_target"):
            data[key] = None if data[key] is None else str(data[key])
        return data
