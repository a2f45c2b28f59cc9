"""`gsd-wsi run PIPELINE.yaml`: run the stages a YAML file lists, in order.

Sections (all optional but at least one slide source):

- ``synthetic_slides``: SyntheticSlideSpec fields plus ``slide_id``; drawn into OUT/slides/.
- ``slides``: existing slide files, folders or CSV manifests, relative to the YAML file.
- ``tile``: TileConfig fields plus ``workers``; patches go to OUT/tiles/.
- ``pretrain``: PretrainConfig fields plus ``nproc``; the run goes to OUT/pretrain/ (a
  finished run is kept; a changed one must be removed by hand, as `gsd-wsi pretrain` asks).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsd_wsi.config import check_keys, dataclass_from_dict, read_yaml_mapping
from gsd_wsi.errors import ConfigError
from gsd_wsi.progress import Progress
from gsd_wsi.stages.pretrain_config import PretrainConfig
from gsd_wsi.stages.tile import SlideResult
from gsd_wsi.stages.tile_batch import run_tile
from gsd_wsi.stages.tile_config import TileConfig
from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide
from gsd_wsi.tissue import TissueConfig
from gsd_wsi.train.pretrain_loop import TrainProgress

logger = logging.getLogger(__name__)

_SECTIONS = {"name", "synthetic_slides", "slides", "tile", "pretrain"}


@dataclass(frozen=True)
class PipelineResult:
    name: str
    slides_dir: Path
    tiles_dir: Path
    tile_results: list[SlideResult]
    pretrain_dir: Path | None = None


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


def run_pipeline(path: str | Path, out_dir: str | Path, progress: Progress | None = None,
                 pretrain_progress: Callable[[], TrainProgress] | None = None) -> PipelineResult:
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

    pretrain_config, nproc = _pretrain_config(path, data.get("pretrain"))
    results = run_tile(sources, tiles_dir, config, workers=workers, progress=progress)
    pretrain_dir = None
    if pretrain_config is not None:
        from gsd_wsi.stages.pretrain import run_pretrain

        pretrain_dir = out_dir / "pretrain"
        finished = (pretrain_dir / "model" / "model.json").exists()
        if finished:
            logger.info("%s holds a finished pretraining run; kept (remove it to train again)", pretrain_dir)
        else:
            run_pretrain([tiles_dir], pretrain_dir, pretrain_config, nproc=nproc, overwrite=True,
                         progress_factory=pretrain_progress)
    return PipelineResult(str(data.get("name", path.stem)), slides_dir, tiles_dir, results, pretrain_dir)


def _pretrain_config(path: Path, section: dict[str, Any] | None) -> tuple[PretrainConfig | None, int]:
    if section is None:
        return None, 1
    settings = dict(section)
    nproc = int(settings.pop("nproc", 1))
    return dataclass_from_dict(PretrainConfig, settings, f"{path}: pretrain"), nproc
