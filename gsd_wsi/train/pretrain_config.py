"""Settings of `gsd-wsi pretrain` (docs/method.md section 1), validated once, saved with the run.

Defaults are the method's faithful values; fixes of the reference code are options whose
defaults docs/method.md sets (loss averaged over the batch, not summed; PyTorch's weight init,
not the reference's N(0, 0.01), which learns far slower: `init="reference"` keeps it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from gsd_wsi.config import dataclass_from_dict, read_yaml_mapping
from gsd_wsi.errors import ConfigError

ModelSize = Literal["tiny", "small", "base"]
Precision = Literal["auto", "fp32", "bf16"]

#: Settings that may change when a run is resumed (how long and how it reports, not what it learns).
RESUMABLE_CHANGES = frozenset({
    "epochs", "steps", "log_every", "val_every", "sample_every", "checkpoint_every", "keep_last",
    "num_workers", "compile", "sample_steps", "n_samples", "val_patches",
})


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelSize = "base"
    image_size: int = 256
    batch_size: int = 8                     # per process
    epochs: int = 100
    steps: int | None = None                # when set, train this many steps instead of epochs
    lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0                   # linear warm-up (the reference has none)
    grad_clip: float | None = None          # max gradient norm (the reference has none)
    ema_decay: float = 0.999
    schedule: Literal["quadratic", "linear", "cosine"] = "quadratic"
    timesteps: int = 1000
    p2_gamma: float = 1.0
    p2_k: float = 1.0
    loss_reduction: Literal["mean", "sum"] = "mean"   # "sum" over the batch is the reference's
    use_top_skip: bool = False
    init: Literal["reference", "pytorch"] = "pytorch"   # "reference": N(0, 0.01) conv/GroupNorm weights
    val_fraction: float = 0.1
    val_patches: int = 256                  # fixed subset of the held-out patches scored at each validation
    seed: int = 0
    num_workers: int = 2                    # DataLoader workers per process
    log_every: int = 10
    val_every: int = 200
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_last: int = 3
    sample_steps: int = 50                  # sampling steps for the monitoring grid (respaced)
    n_samples: int = 8
    precision: Precision = "auto"           # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool | None = None       # None: on GPU only
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "epochs", "timesteps", "log_every", "val_every", "sample_every",
                     "checkpoint_every", "n_samples", "sample_steps", "val_patches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive whole number (got {getattr(self, name)!r})")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be positive (got {self.steps})")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive (got {self.lr})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be positive or unset (got {self.grad_clip})")
        if self.warmup_steps < 0 or self.num_workers < 0 or self.keep_last < 1:
            raise ConfigError("warmup_steps and num_workers must be >= 0, keep_last >= 1")
        if self.image_size % 16:
            raise ConfigError(f"image_size must be a multiple of 16 (got {self.image_size})")
        for name, options in (("model", ModelSize), ("precision", Precision)):
            if getattr(self, name) not in get_args(options):
                raise ConfigError(f"{name} must be one of {', '.join(get_args(options))} (got {getattr(self, name)!r})")
        if self.sample_steps > self.timesteps:
            raise ConfigError(f"sample_steps ({self.sample_steps}) cannot exceed timesteps ({self.timesteps})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> PretrainConfig:
        return dataclass_from_dict(cls, data, where)

    def learning_settings(self) -> dict[str, Any]:
        """What must be equal for a resumed run to be the same run."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}


def load_yaml_settings(path: Path) -> dict[str, Any]:
    """Settings from a YAML file (keys as in PretrainConfig; dashes allowed)."""
    data = read_yaml_mapping(path, f"--config {path}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
