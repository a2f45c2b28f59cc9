"""A fine-tuned segmentation model with the preprocessing it was trained with.

``load_segmentation_model(RUN)`` reads the folder `gsd-wsi finetune -o RUN` wrote and returns
the network together with what `segment` must reproduce without flags: the resolution
(mpp), the window size, the input range, the class names and the stain normalisation
(method and target; the source is fitted once per slide). ``predict`` runs windows through
the network at t = 0 and returns class probabilities::

    model = load_segmentation_model("runs/seg", device="cuda")
    probabilities = model.predict(windows_uint8)       # (N, H, W, 3) uint8 -> (N, C, H, W) float32
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsd_wsi.errors import ConfigError
from gsd_wsi.instances import PostprocessConfig, recorded_postprocess
from gsd_wsi.nn.inference import dihedral_mean, output_probabilities
from gsd_wsi.nn.precision import use_bf16
from gsd_wsi.nn.unet import UNet
from gsd_wsi.stain import StainNormalizer, make_normalizer, recorded_normaliser
from gsd_wsi.train import checkpoint as ckpt
from gsd_wsi.train.ddp import resolve_device
from gsd_wsi.train.transfer import load_segmentation_network
from gsd_wsi.zoo import builtin_for_mpp, builtin_name_of, builtin_or_path, family_members

logger = logging.getLogger(__name__)


@dataclass
class SegmentationModel:
    """The network and its preprocessing (see the module docstring)."""

    network: UNet
    folder: Path
    classes: list[str]
    patch_px: int
    mpp: float | None
    input_range: tuple[float, float]
    stain: dict[str, Any]
    digest: str                      # hash of model.json and the weights: what a mask depends on
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    info: dict[str, Any] = field(default_factory=dict)
    #: Average each window over its 8 flips and rotations (model.json ``"tta"`` by default).
    tta: bool = False
    #: What the network learnt (model.json ``"target"``): semantic, contour or distance.
    target: str = field(init=False)
    _postprocess: PostprocessConfig | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Read once (and checked at load): forward() needs the target on every batch.
        self.target, self._postprocess = recorded_postprocess(self.info)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def finds_instances(self) -> bool:
        """An instance-aware target: `segment` writes instances, detections and counts."""
        return self.target in ("contour", "distance")

    @property
    def mask_classes(self) -> list[str]:
        """Classes of the class mask: an instance model's are background and its object."""
        return self.classes[:2] if self.finds_instances else self.classes

    def postprocess(self) -> PostprocessConfig | None:
        """How probabilities become instances (model.json ``"postprocess"``; always set for an instance model)."""
        return self._postprocess

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def normaliser(self) -> StainNormalizer:
        """A fresh normaliser with the model's target; fit its source on the slide first."""
        return recorded_normaliser(self.stain) or make_normalizer("none")

    def to(self, device: torch.device | str) -> SegmentationModel:
        """Move the network; on CUDA it runs channels_last, with bf16 autocast there and on CPUs with
        bf16 units (gsd_wsi/nn/precision.py)."""
        self.device = torch.device(device)
        memory_format = torch.channels_last if self.on_gpu else torch.contiguous_format
        self.network = self.network.to(self.device, memory_format=memory_format).eval()
        return self

    def to_input(self, windows_uint8: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float on the model's device, in its input range.

        On CUDA the batch goes through pinned memory with a non-blocking copy, and is
        scaled on the GPU."""
        batch = torch.from_numpy(np.ascontiguousarray(windows_uint8))
        if self.on_gpu:
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = batch.permute(0, 3, 1, 2).float()
        low, high = self.input_range
        x = x * ((high - low) / 255.0) + low
        return x.contiguous(memory_format=torch.channels_last) if self.on_gpu else x

    @torch.inference_mode()
    def predict(self, windows_uint8: np.ndarray) -> np.ndarray:
        """Softmax class probabilities (N, C, H, W) float32 of uint8 RGB windows, at t = 0."""
        x = self.to_input(windows_uint8)
        return self.forward(x)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> np.ndarray:
        """The network alone on a prepared input batch (as :meth:`to_input` makes): probabilities
        (a distance model's third channel is its distance map, gsd_wsi/nn/inference.output_probabilities)."""
        bf16 = use_bf16("auto", self.device)

        def network(batch: torch.Tensor) -> torch.Tensor:
            t = torch.zeros(batch.shape[0], dtype=torch.long, device=batch.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                return output_probabilities(self.network(batch, t), self.target)

        return (dihedral_mean(network, x) if self.tta else network(x)).cpu().numpy()


def model_digest(folder: Path) -> str:
    """Hash of a model folder's model.json and weights (16 hex digits)."""
    h = hashlib.sha256()
    for name in (ckpt.MODEL_JSON, ckpt.MODEL_WEIGHTS):
        with open(folder / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def model_folder(path: str | Path, mpp: float | None = None) -> Path:
    """``RUN/model`` of a fine-tuning run folder, the checkpoint folder itself, or the folder of
    a built-in model named ``path`` (a family's member for images at ``mpp``, gsd_wsi/zoo)."""
    path = builtin_or_path(path, mpp)
    if not path.exists():
        raise ConfigError(f"--model {path}: no such folder; give the folder `gsd-wsi finetune -o` wrote")
    folder = path if (path / ckpt.MODEL_JSON).is_file() else path / "model"
    if not (folder / ckpt.MODEL_JSON).is_file():
        raise ConfigError(f"--model {path}: no model.json here or in model/; give the folder `gsd-wsi finetune -o` wrote")
    if not (folder / ckpt.MODEL_WEIGHTS).is_file():
        raise ConfigError(f"--model {path}: {folder} has no {ckpt.MODEL_WEIGHTS}; the model is incomplete, fine-tune again")
    return folder


class ModelChoice:
    """What slides are segmented with: one model folder, or a built-in family whose member is
    picked by each slide's resolution (gsd_wsi/zoo); every model is loaded once, on first use.

    ``spec`` is a folder, a built-in name (``nuclei``, ``nuclei-40x``) or a loaded model.
    A bad folder or an unknown name is refused here, before any slide is read.
    """

    def __init__(self, spec: str | Path | SegmentationModel, device: str | torch.device = "cpu",
                 tta: bool | None = None) -> None:
        self.device, self.tta = device, tta
        self._loaded: dict[Path, SegmentationModel] = {}
        self.builtin: str | None = None
        if isinstance(spec, SegmentationModel):
            self._fixed: SegmentationModel | None = spec
        else:
            self.builtin = builtin_name_of(spec)
            self._fixed = None if self.builtin else load_segmentation_model(spec, device, tta)
            if self.builtin:
                family_members(self.builtin)

    def for_mpp(self, slide_mpp: float | None) -> SegmentationModel:
        """The model for a slide at ``slide_mpp`` (a fixed model whatever it is)."""
        if self._fixed is not None:
            return self._fixed
        assert self.builtin is not None
        folder = builtin_for_mpp(self.builtin, slide_mpp).folder
        if folder not in self._loaded:
            self._loaded[folder] = load_segmentation_model(folder, self.device, self.tta)
        return self._loaded[folder]

    @property
    def digest(self) -> str:
        """What outputs depend on: the model's digest, or a family's members' together."""
        if self._fixed is not None:
            return self._fixed.digest
        assert self.builtin is not None
        h = hashlib.sha256("".join(model_digest(m.folder) for m in family_members(self.builtin)).encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        if self._fixed is not None:
            model = self._fixed
            return f"{model.folder} ({'/'.join(model.classes)}, {model.mpp:g} um/px, {model.patch_px}-px windows)"
        members = family_members(self.builtin or "")
        return f"built-in {self.builtin} ({', '.join(f'{m.name} at {m.mpp:g} um/px' for m in members)})"


def load_segmentation_model(path: str | Path, device: str | torch.device = "cpu",
                            tta: bool | None = None) -> SegmentationModel:
    """The fine-tuned model in ``path`` (a `gsd-wsi finetune` run folder or its ``model/``),
    on ``device`` ("auto", "cpu", "cuda" or a torch device), in eval mode; ``tta`` None takes
    the model's own default (model.json ``"tta"``, else off).

    Refuses, with a message naming the fix, a pretraining run, a folder with missing files
    and a model that records no resolution.
    """
    folder = model_folder(path)
    network, info = load_segmentation_network(folder)
    if info.get("mpp") is None:
        raise ConfigError(f"--model {path}: the model records no resolution (mpp), so slides cannot be brought to it; "
                          f"fine-tune it again with --mpp (the training images' um/px)")
    model = SegmentationModel(
        network=network, folder=folder, classes=[str(c) for c in info["classes"]], patch_px=int(info["patch_px"]),
        mpp=float(info["mpp"]), input_range=(float(info["input_range"][0]), float(info["input_range"][1])),
        stain=dict(info.get("stain") or {"method": "none"}), digest=model_digest(folder), info=info,
        tta=bool(info.get("tta", False)) if tta is None else tta,
    )
    resolved = resolve_device(device) if isinstance(device, str) and device in ("auto", "cpu", "cuda") else torch.device(device)
    return model.to(resolved)
