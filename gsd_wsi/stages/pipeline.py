"""`gsd-wsi run PIPELINE.yaml`: run the stages a YAML file lists, in order.

Sections (all optional but at least one slide source):

- ``synthetic_slides``: SyntheticSlideSpec fields plus ``slide_id``; drawn into OUT/slides/.
- ``slides``: existing slide files, folders or CSV manifests, relative to the YAML file.
- ``tile``: TileConfig fields plus ``workers``; patches go to OUT/tiles/.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsd_wsi.config import check_keys, read_yaml_mapping
from gsd_wsi.errors import ConfigError
from gsd_wsi.progress import Progress
from gsd_wsi.stages.tile import SlideResult
from gsd_wsi.stages.tile_batch import run_tile
from gsd_wsi.stages.tile_config import TileConfig
from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide
from gsd_wsi.tissue import TissueConfig

logger = logging.getLogger(__name__)

_SECTIONS = {"name", "synthetic_slides", "slides", "tile"}


@dataclass(frozen=True)
class PipelineResult:
    name: str
    slides_dir: Path
    tiles_dir: Path
    tile_results: list[SlideResult]


def _fields_of(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def load_pipeline(path: Path) -> dict[str, Any]:
    data = read_yaml_mapping(path, f"pipeline {path}")
    check_keys(str(path), data, _SECTIONS)
    return data


def _tile_config(path: Path, settings: dict[str, Any]) -> tuple[TileConfig, int]:
    """The tile section as a validated TileConfig and a worker count."""
    workers = int(settings.pop("workers", 1))
    check_keys(f"{path}: tile", settings, _fields_of(TileConfig) | {"thumb_mpp"})
    if "thumb_mpp" in settings:
        settings["tissue"] = TissueConfig(thumb_mpp=float(settings.pop("thumb_mpp")))
    if settings.get("stain_target") is not None:
        settings["stain_target"] = path.parent / settings["stain_target"]
    return TileConfig(**settings), workers


def run_pipeline(path: str | Path, out_dir: str | Path, progress: Progress | None = None) -> PipelineResult:
    path, out_dir = Path(path), Path(out_dir)
    data = load_pipeline(path)
    slides_dir, tiles_dir = out_dir / "slides", out_dir / "tiles"
    config, workers = _tile_config(path, dict(data.get("tile") or {}))
    sources: list[str | Path] = [path.parent / s for s in data.get("slides") or []]

    for i, entry in enumerate(data.get("synthetic_slides") or []):
        entry = dict(entry)
        slide_id = str(entry.pop("slide_id", f"synthetic-{i}"))
        check_keys(f"{path}: synthetic_slides[{i}]", entry, _fields_of(SyntheticSlideSpec))
        spec = SyntheticSlideSpec(**entry)
        target = slides_dir / f"{slide_id}.{spec.fmt}"
        if not target.exists():  # deterministic: an existing one is the same slide
            write_synthetic_slide(target, spec)
        sources.append(target)
    if not sources:
        raise ConfigError(f"{path}: no slides; add a 'slides' or 'synthetic_slides' section")

    results = run_tile(sources, tiles_dir, config, workers=workers, progress=progress)
    return PipelineResult(str(data.get("name", path.stem)), slides_dir, tiles_dir, results)
