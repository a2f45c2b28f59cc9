"""Settings of `gsd-wsi segment`, validated once, hashed (with the model) to recognise finished outputs.

The preprocessing (resolution, window size, input range, classes, stain method and target)
is not here: it comes from the model, so a mask is always made as the model was trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from gsd_wsi.errors import ConfigError
from gsd_wsi.slide import BACKENDS
from gsd_wsi.tissue import TissueConfig

#: Settings that change no output pixel, left out of the hash (a rerun with more workers
#: or another batch size reuses the finished slides).
_NOT_HASHED = ("batch_size", "workers", "device", "backend")


@dataclass(frozen=True)
class SegmentConfig:
    overlap: float = 0.25                 # of the window side
    batch_size: int = 8                   # windows per forward pass
    workers: int = 2                      # reader threads (each opens the slide once)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    probabilities: bool = False           # also write class probabilities (uint8 0-255)
    min_area_um2: float = 0.0             # GeoJSON regions smaller than this are dropped
    weights: Literal["gaussian", "ramp"] = "gaussian"
    tissue: TissueConfig = field(default_factory=TissueConfig)
    tissue_margin_windows: float = 1.0    # windows reach this many window sides beyond tissue
    tissue_max_mpx: float = 4.0           # detect tissue on at most this many thumbnail Mpx
    stain_sample_windows: int = 64        # windows sampled across the slide to fit its stains
    backend: str = "auto"                 # slide reader
    band_px: int = 256                    # rows stitched at once (float buffers: width x band x C)
    chunk_px: int = 512                   # chunk side of the zarr pyramid (a multiple of band_px)
    tiff_tile_px: int = 512
    geojson_chunk_px: int = 2048
    tta: bool | None = None               # mean over the 8 flips and rotations; None: the model's default

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"--overlap is a fraction of the window in [0, 1) (got {self.overlap})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1 (got {self.workers})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda (got {self.device!r})")
        if not self.min_area_um2 >= 0:
            raise ConfigError(f"--min-area-um2 must be >= 0 (got {self.min_area_um2})")
        if self.weights not in ("gaussian", "ramp"):
            raise ConfigError(f"window weights must be gaussian or ramp (got {self.weights!r})")
        if self.tissue_margin_windows < 0:
            raise ConfigError(f"tissue_margin_windows must be >= 0 (got {self.tissue_margin_windows})")
        if not self.tissue_max_mpx > 0:
            raise ConfigError(f"tissue_max_mpx must be positive (got {self.tissue_max_mpx})")
        if self.stain_sample_windows < 1:
            raise ConfigError(f"stain_sample_windows must be at least 1 (got {self.stain_sample_windows})")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.band_px < 64 or self.band_px % 64:
            raise ConfigError(f"band_px must be a multiple of 64, at least 64 (got {self.band_px})")
        if self.chunk_px < self.band_px or self.chunk_px % self.band_px:
            raise ConfigError(f"chunk_px must be a multiple of band_px {self.band_px} (got {self.chunk_px})")
        if self.tiff_tile_px not in (256, 512):
            raise ConfigError(f"tiff_tile_px must be 256 or 512 (got {self.tiff_tile_px})")
        if self.geojson_chunk_px < 64:
            raise ConfigError(f"geojson_chunk_px must be at least 64 (got {self.geojson_chunk_px})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_settings(self) -> dict[str, Any]:
        data = self.to_dict()
        for key in _NOT_HASHED:
            data.pop(key)
        return data


def tissue_thumb_mpp(config: SegmentConfig, slide_um2: float) -> float:
    """The thumbnail resolution for tissue detection: the configured one, coarsened on slides
    so large that its thumbnail would pass ``tissue_max_mpx``. Tissue detection holds about 30
    bytes per thumbnail pixel, so this bounds the one part of a slide's memory that would
    otherwise grow with its area (a 40 x 40 mm scan at 8 um/px is a 25 Mpx thumbnail)."""
    return max(config.tissue.thumb_mpp, math.sqrt(slide_um2 / (config.tissue_max_mpx * 1e6)))


def segment_settings_hash(config: SegmentConfig, model_digest: str, slide_mpp: float, slide_bytes: int) -> str:
    """Hash of everything a slide's outputs depend on: settings, model, the slide's resolution and size."""
    payload = {"settings": config.output_settings(), "model": model_digest, "slide_mpp": slide_mpp,
               "slide_bytes": slide_bytes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
