"""Settings of `gsd-wsi tile`, validated once, hashed to recognise finished outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gsd_wsi.errors import ConfigError
from gsd_wsi.slide import BACKENDS
from gsd_wsi.stain import check_stain_options
from gsd_wsi.store import SHARD_PATCHES
from gsd_wsi.tissue import TissueConfig

StainMethod = Literal["macenko", "reinhard", "vahadane", "none"]


@dataclass(frozen=True)
class TileConfig:
    """How slides become patches. Every field that changes the output enters the hash."""

    mpp: float = 0.5                      # target resolution of the patches, um/px
    tile_px: int = 256
    stride_px: int | None = None          # None: the tile size (no overlap)
    min_tissue: float = 0.5               # keep tiles with at least this tissue fraction
    stain: StainMethod = "macenko"
    stain_target: Path | None = None      # image to take the target stains from; None: built-in
    tissue: TissueConfig = field(default_factory=TissueConfig)
    backend: str = "auto"                 # slide reader; "auto" takes the fastest that fits
    stain_sample_tiles: int = 64          # tiles sampled across the slide to fit its stains
    shard_patches: int = SHARD_PATCHES

    def __post_init__(self) -> None:
        if not self.mpp > 0:
            raise ConfigError(f"--mpp must be positive (got {self.mpp})")
        if self.tile_px < 16 or self.tile_px > 4096:
            raise ConfigError(f"--tile-px must be between 16 and 4096 (got {self.tile_px})")
        if self.stride_px is not None and not 1 <= self.stride_px <= self.tile_px:
            raise ConfigError(
                f"--stride-px must be between 1 and the tile size {self.tile_px} (got {self.stride_px}); "
                f"a stride larger than the tile would leave gaps between tiles"
            )
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue is a fraction between 0 and 1 (got {self.min_tissue})")
        check_stain_options(self.stain, self.stain_target)
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.stain_sample_tiles < 1:
            raise ConfigError(f"stain_sample_tiles must be at least 1 (got {self.stain_sample_tiles})")
        if self.shard_patches < 1:
            raise ConfigError(f"shard_patches must be at least 1 (got {self.shard_patches})")

    @property
    def stride(self) -> int:
        return self.tile_px if self.stride_px is None else self.stride_px

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings)."""
        data = dataclasses.asdict(self)
        data["stride_px"] = self.stride
        data["stain_target"] = None if self.stain_target is None else str(self.stain_target)
        return data

    def output_settings(self) -> dict[str, Any]:
        """The settings that change a store's content (not the reader, which gives equal pixels)."""
        data = self.to_dict()
        data.pop("backend")
        if self.stain_target is not None:
            data["stain_target"] = hashlib.sha256(Path(self.stain_target).read_bytes()).hexdigest()
        return data


def settings_hash(config: TileConfig, slide_mpp: float, slide_bytes: int) -> str:
    """Hash of everything a store depends on: settings, the slide's resolution and size."""
    payload = {"settings": config.output_settings(), "slide_mpp": slide_mpp, "slide_bytes": slide_bytes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
