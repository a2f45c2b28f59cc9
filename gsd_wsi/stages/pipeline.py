"""`gsd-wsi run PIPELINE.yaml`: the stages a YAML file lists, in order, into one folder.

Sections (all optional; the slide stages need at least one slide source). Paths are
relative to the YAML file; ``--set section.key=value`` overrides any setting.

- ``labelled_data``, ``split_file``: a labelled image folder (MoNuSeg, GlaS, images/ + masks/)
  and its split file, the defaults of finetune and evaluate; ``slides_from_labelled: train``
  also tiles the images of that subset (never the test images) for pretraining.
- ``synthetic_slides``: SyntheticSlideSpec fields plus ``slide_id``; drawn into OUT/slides/.
- ``slides``: existing slide files, folders or CSV manifests, or mappings with a ``path`` and
  ``slide_id``, ``mpp``, ``model`` (that slide's segmentation model: a folder or a built-in
  name such as ``nuclei``) and ``optional`` (a missing file is skipped with a warning);
  ``slide_mpp`` for files without one.
- ``cohort``: how slides are run (CohortConfig: scheduler, workers, retries, ...).
- ``tile``: TileConfig fields plus ``thumb_mpp``; the cohort's tile stage, into OUT/cohort/.
- ``pretrain``: PretrainConfig fields plus ``nproc``; on the tiles, into OUT/pretrain/.
- ``labels``: labelled crops drawn from a synthetic slide's ground truth (``synthetic_slide``,
  ``mpp``, ``crop_px``, ``n_crops``) into OUT/labels/ (images/ + masks/).
- ``finetune``: FinetuneConfig fields plus ``data`` (default OUT/labels) and ``pretrained``
  (``pretrain``: this pipeline's, the default when it has one; ``none``; or a run folder);
  into OUT/finetune/.
- ``evaluate``: EvaluateConfig fields plus ``data`` (default: finetune's); into OUT/evaluate/.
- ``segment``: SegmentConfig fields plus ``thumb_mpp`` and ``model`` (default OUT/finetune, else the
  built-in ``nuclei`` model);
  the cohort's segment stage (tile too when the pipeline tiles), with OUT/cohort/report.html.

Finished work is kept: the cohort skips finished slides, a finished pretraining or
fine-tuning run is reused; ``overwrite`` redoes everything.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gsd_wsi.atomic import atomic_write_csv
from gsd_wsi.config import check_keys, dataclass_from_dict, read_yaml_mapping
from gsd_wsi.errors import ConfigError
from gsd_wsi.stages.cohort import CohortConfig, CohortProgress, CohortResult, run_cohort
from gsd_wsi.stages.segment_config import SegmentConfig
from gsd_wsi.stages.tile_config import TileConfig
from gsd_wsi.synthetic import SyntheticSlideSpec, synthetic_truth, write_synthetic_slide
from gsd_wsi.tissue import TissueConfig
from gsd_wsi.zoo import DEFAULT_FAMILY

logger = logging.getLogger(__name__)

_SECTIONS = {"name", "labelled_data", "split_file", "slides_from_labelled", "synthetic_slides", "slides", "slide_mpp",
             "cohort", "tile", "pretrain", "labels", "finetune",
             "evaluate", "segment"}
_LABEL_KEYS = {"synthetic_slide", "mpp", "crop_px", "n_crops", "seed"}
_COHORT_KEYS = {"scheduler", "workers", "threads_per_worker", "retries", "timeout_per_slide_s", "connect_timeout_s",
                "stale_lock_s", "gpu_resource"}


@dataclass(frozen=True)
class PipelineResult:
    name: str
    out_dir: Path
    slides_dir: Path
    cohort_dir: Path
    tile: CohortResult | None = None
    pretrain_dir: Path | None = None
    labels_dir: Path | None = None
    finetune_dir: Path | None = None
    evaluate: dict[str, Any] | None = None
    segment: CohortResult | None = None

    @property
    def n_failed(self) -> int:
        return sum(r.count("failed") for r in (self.tile, self.segment) if r is not None)

    @property
    def report_path(self) -> Path | None:
        for result in (self.segment, self.tile):
            if result is not None and result.report_path is not None:
                return result.report_path
        return None


def _fields_of(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``section.key=value`` settings (values parsed as YAML) over the file's."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. finetune.epochs=5")
        *sections, name = key.split(".")
        target = data
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {section} is not a section")
        target[name] = yaml.safe_load(text)
    return data


def load_pipeline(path: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    data = apply_overrides(read_yaml_mapping(path, f"pipeline {path}"), overrides)
    check_keys(str(path), data, _SECTIONS)
    return data


def _relative(path: Path, value: str | Path | None) -> Path | None:
    return None if value is None else (path.parent / value)


def _model_ref(path: Path, value: str | Path | None) -> Path | str | None:
    """A model key's value: a folder relative to the pipeline file, or a built-in model's name
    (``nuclei``) where no such folder exists."""
    folder = _relative(path, value)
    if folder is None or folder.exists():
        return folder
    from gsd_wsi.zoo import builtin_name_of

    return builtin_name_of(str(value)) or folder


def _tissue(settings: dict[str, Any], base: TissueConfig) -> TissueConfig:
    return TissueConfig(thumb_mpp=float(settings.pop("thumb_mpp"))) if "thumb_mpp" in settings else base


def _tile_config(path: Path, section: dict[str, Any]) -> TileConfig:
    settings = dict(section)
    check_keys(f"{path}: tile", settings, _fields_of(TileConfig) | {"thumb_mpp"})
    settings["tissue"] = _tissue(settings, TissueConfig())
    if settings.get("stain_target") is not None:
        settings["stain_target"] = _relative(path, settings["stain_target"])
    return TileConfig(**settings)


def _cohort_config(path: Path, data: dict[str, Any], stages: tuple[str, ...], tile: TileConfig,
                   segment: SegmentConfig, overwrite: bool) -> CohortConfig:
    settings = dict(data.get("cohort") or {})
    check_keys(f"{path}: cohort", settings, _COHORT_KEYS)
    return CohortConfig(stages=stages, tile=tile, segment=segment, overwrite=overwrite,
                        report_title=f"gsd-wsi {data.get('name', path.stem)}: cohort report", **settings)


_SLIDE_ENTRY_KEYS = {"path", "slide_id", "mpp", "model", "optional"}


def _slide_entries(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``slides`` list's mapping entries, checked: ``path`` (required), ``slide_id``, ``mpp``,
    ``model`` (this slide's model: a folder or a built-in name) and ``optional`` (a missing file is
    skipped with a warning instead of failing the run, for slides that are not always there)."""
    entries = []
    for i, entry in enumerate(data.get("slides") or []):
        if isinstance(entry, dict):
            check_keys(f"{path}: slides[{i}]", entry, _SLIDE_ENTRY_KEYS)
            if not entry.get("path"):
                raise ConfigError(f"{path}: slides[{i}] needs a path")
            entries.append(entry)
        elif not isinstance(entry, str):
            raise ConfigError(f"{path}: slides[{i}] must be a path or a mapping with a path; got {entry!r}")
    return entries


def _entries_manifest(path: Path, entries: list[dict[str, Any]], slides_dir: Path) -> Path | None:
    """The mapping entries as a CSV manifest in OUT/slides/ (what the slide stages read), the
    optional ones whose file is missing left out with a warning; None when none is left."""
    rows = []
    for entry in entries:
        slide = path.parent / str(entry["path"])
        if entry.get("optional") and not slide.exists():
            logger.warning("%s: optional slide %s is not there; skipped", path, slide)
            continue
        model = _model_ref(path, entry.get("model"))
        rows.append({"path": str(slide.resolve()), "slide_id": entry.get("slide_id") or "",
                     "mpp": entry.get("mpp") or "",
                     "model": "" if model is None else str(model.resolve() if isinstance(model, Path) else model)})
    if not rows:
        return None
    slides_dir.mkdir(parents=True, exist_ok=True)
    manifest = slides_dir / "pipeline_slides.csv"
    atomic_write_csv(manifest, rows)
    return manifest


def _slide_sources(path: Path, data: dict[str, Any], slides_dir: Path) -> list[str | Path]:
    sources: list[str | Path] = [path.parent / s for s in data.get("slides") or [] if isinstance(s, str)]
    manifest = _entries_manifest(path, _slide_entries(path, data), slides_dir)
    if manifest is not None:
        sources.append(manifest)
    if data.get("slides_from_labelled") is not None:
        sources.extend(_labelled_images(path, data, str(data["slides_from_labelled"])))
    for i, entry in enumerate(data.get("synthetic_slides") or []):
        spec, slide_id = _synthetic_spec(path, i, entry)
        target = slides_dir / f"{slide_id}.{spec.fmt}"
        if not target.exists():  # deterministic: an existing one is the same slide
            write_synthetic_slide(target, spec)
        sources.append(target)
    return sources


def _labelled_images(path: Path, data: dict[str, Any], subset: str) -> list[Path]:
    """The images of one subset of the split (by name), from the labelled folder."""
    from gsd_wsi.datasets import read_split_file

    folder, split_file = _relative(path, data.get("labelled_data")), _relative(path, data.get("split_file"))
    if folder is None or split_file is None:
        raise ConfigError(f"{path}: slides_from_labelled needs labelled_data and split_file")
    images = folder / "images" if (folder / "images").is_dir() else folder
    if not images.is_dir():
        raise ConfigError(f"{path}: labelled_data {folder} is not a folder; --set labelled_data=PATH")
    names = read_split_file(split_file).get(subset)
    if names is None:
        raise ConfigError(f"{path}: the split file {split_file} has no {subset!r} list")
    by_stem = {p.stem: p for p in images.iterdir() if p.suffix.lower() in {".tif", ".tiff", ".png", ".bmp", ".jpg"}}
    missing = [n for n in names if n not in by_stem]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} image(s) of the split's {subset!r} list are not in {images}: "
                          f"{', '.join(missing[:5])}")
    return [by_stem[n] for n in names]


def _synthetic_spec(path: Path, index: int, entry: dict[str, Any]) -> tuple[SyntheticSlideSpec, str]:
    entry = dict(entry)
    slide_id = str(entry.pop("slide_id", f"synthetic-{index}"))
    check_keys(f"{path}: synthetic_slides[{index}]", entry, _fields_of(SyntheticSlideSpec))
    return SyntheticSlideSpec(**entry), slide_id


def run_pipeline(path: str | Path, out_dir: str | Path, overrides: Sequence[str] = (), overwrite: bool = False,
                 progress: Callable[[], CohortProgress] | None = None,
                 train_progress: Callable[[], Any] | None = None) -> PipelineResult:
    """Run every section of the pipeline file at ``path`` into ``out_dir``; see the module docstring."""
    path, out_dir = Path(path), Path(out_dir)
    data = check_pipeline(path, overrides)  # a typo in a late section fails now, not after the early ones
    name = str(data.get("name", path.stem))
    slides_dir, cohort_dir = out_dir / "slides", out_dir / "cohort"
    tile = _tile_config(path, data["tile"]) if data.get("tile") is not None else None
    segment = _segment_settings(path, data.get("segment"))
    slide_mpp = data.get("slide_mpp")
    result = PipelineResult(name, out_dir, slides_dir, cohort_dir)
    needs_slides = tile is not None or segment is not None
    sources = _slide_sources(path, data, slides_dir) if needs_slides else []
    if needs_slides and not sources:
        raise ConfigError(f"{path}: no slides; add a 'slides' or 'synthetic_slides' section")

    def cohort(stages: tuple[str, ...], model: Path | str | None, report: bool) -> CohortResult:
        config = _cohort_config(path, data, stages, tile or TileConfig(), segment[0] if segment else SegmentConfig(),
                                overwrite)
        return run_cohort(sources, cohort_dir, model, dataclasses.replace(config, report=report), slide_mpp,
                          progress() if progress else None)

    if tile is not None:
        result = dataclasses.replace(result, tile=cohort(("tile",), None, report=segment is None))
    if data.get("pretrain") is not None:
        result = dataclasses.replace(result, pretrain_dir=_pretrain(path, data["pretrain"], result, overwrite,
                                                                    train_progress))
    if data.get("labels") is not None:
        result = dataclasses.replace(result, labels_dir=_labels(path, data, out_dir / "labels"))
    if data.get("finetune") is not None:
        result = dataclasses.replace(result, finetune_dir=_finetune(path, data["finetune"], data, result, overwrite,
                                                                    train_progress))
    if data.get("evaluate") is not None:
        result = dataclasses.replace(result, evaluate=_evaluate(path, data, result))
    if segment is not None:
        config, model = segment
        # no segment.model: the pipeline's own fine-tuned model, else the built-in nuclei model
        model_dir = _model_ref(path, model) if model is not None else (result.finetune_dir or DEFAULT_FAMILY)
        stages = ("tile", "segment") if tile is not None else ("segment",)
        result = dataclasses.replace(result, segment=cohort(stages, model_dir, report=True))
    return result


def _segment_settings(path: Path, section: dict[str, Any] | None) -> tuple[SegmentConfig, str | None] | None:
    if section is None:
        return None
    settings = dict(section)
    model = settings.pop("model", None)
    check_keys(f"{path}: segment", settings, _fields_of(SegmentConfig) | {"thumb_mpp"})
    settings["tissue"] = _tissue(settings, SegmentConfig().tissue)
    return SegmentConfig(**settings), model


def _pretrain_settings(path: Path, section: dict[str, Any]) -> tuple[Any, int, list[Path]]:
    from gsd_wsi.train.pretrain_config import PretrainConfig

    settings = dict(section)
    nproc = int(settings.pop("nproc", 1))
    stores = [_relative(path, p) for p in settings.pop("stores", [])]
    return dataclass_from_dict(PretrainConfig, settings, f"{path}: pretrain"), nproc, stores  # type: ignore[return-value]


def _pretrain(path: Path, section: dict[str, Any], result: PipelineResult, overwrite: bool,
              train_progress: Callable[[], Any] | None) -> Path:
    from gsd_wsi.stages.pretrain import run_pretrain

    config, nproc, stores = _pretrain_settings(path, section)
    if not stores and result.tile is not None:
        stores = [result.cohort_dir / s.slide.slide_id / "tile" / "patches.zarr" for s in result.tile.slides
                  if s.records["tile"].status in ("done", "skipped")]
    if not stores:
        raise ConfigError(f"{path}: pretrain has no patches: add a tile section, or pretrain.stores")
    run_dir = result.out_dir / "pretrain"
    if (run_dir / "model" / "model.json").exists() and not overwrite:
        logger.info("%s holds a finished pretraining run; kept (--overwrite trains again)", run_dir)
        return run_dir
    run_pretrain(stores, run_dir, config, nproc=nproc, overwrite=True, progress_factory=train_progress)
    return run_dir


def _labels(path: Path, data: dict[str, Any], labels_dir: Path) -> Path:
    """Labelled crops from a synthetic slide's drawn ground truth (its glands)."""
    from gsd_wsi.synthetic_labels import write_labelled_crops

    settings = dict(data["labels"])
    check_keys(f"{path}: labels", settings, _LABEL_KEYS)
    wanted = settings.pop("synthetic_slide", None)
    entries = [_synthetic_spec(path, i, e) for i, e in enumerate(data.get("synthetic_slides") or [])]
    match = [(spec, sid) for spec, sid in entries if wanted is None or sid == wanted]
    if not match:
        raise ConfigError(f"{path}: labels.synthetic_slide {wanted!r} is not one of the synthetic_slides")
    spec, slide_id = match[0]
    if (labels_dir / "images").is_dir() and any((labels_dir / "images").iterdir()):
        return labels_dir  # deterministic: the same crops
    slide_path = labels_dir.parent / "slides" / f"{slide_id}.{spec.fmt}"
    truth = synthetic_truth(slide_path, spec) if slide_path.exists() else write_synthetic_slide(slide_path, spec)
    tmp = labels_dir.with_name(labels_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_labelled_crops(truth, tmp, **settings)
    tmp.replace(labels_dir)
    return labels_dir


def _finetune_settings(path: Path, section: dict[str, Any], defaults: dict[str, Any]) -> tuple[Any, Path | None, str | None]:
    from gsd_wsi.stages.finetune import FinetuneConfig

    settings = dict(section)
    if defaults.get("split_file") is not None:
        settings.setdefault("split_file", defaults["split_file"])
    data_dir = _relative(path, settings.pop("data", None))
    pretrained = settings.pop("pretrained", None)
    for key in ("split_file", "stain_target"):
        if settings.get(key) is not None:
            settings[key] = _relative(path, settings[key])
    if settings.get("class_names") is not None:
        settings["class_names"] = tuple(settings["class_names"])
    config = dataclass_from_dict(FinetuneConfig, settings, f"{path}: finetune")
    return config, data_dir, None if pretrained is None else str(pretrained)


def _finetune(path: Path, section: dict[str, Any], defaults: dict[str, Any], result: PipelineResult, overwrite: bool,
              train_progress: Callable[[], Any] | None) -> Path:
    from gsd_wsi.stages.finetune import run_finetune

    config, data_dir, pretrained = _finetune_settings(path, section, defaults)
    data_dir = data_dir or _relative(path, defaults.get("labelled_data")) or result.labels_dir
    if data_dir is None:
        raise ConfigError(f"{path}: finetune needs data: set finetune.data, or add a labels section")
    pretrained = pretrained or ("pretrain" if result.pretrain_dir else "none")
    named = {"none": None, "pretrain": result.pretrain_dir}
    source = named[pretrained.lower()] if pretrained.lower() in named else _model_ref(path, pretrained)
    if pretrained.lower() == "pretrain" and source is None:
        raise ConfigError(f"{path}: finetune.pretrained is 'pretrain' but the pipeline has no pretrain section")
    run_dir = result.out_dir / "finetune"
    if (run_dir / "model" / "model.json").exists() and not overwrite:
        logger.info("%s holds a finished fine-tuning run; kept (--overwrite trains again)", run_dir)
        return run_dir
    run_finetune(data_dir, run_dir, config, source, overwrite=True, progress_factory=train_progress)
    return run_dir


def _evaluate_settings(path: Path, data: dict[str, Any]) -> tuple[Any, Path | None, Path | None]:
    from gsd_wsi.stages.evaluate import EvaluateConfig

    settings = dict(data["evaluate"])
    if data.get("split_file") is not None:
        settings.setdefault("split_file", data["split_file"])
    data_dir = (_relative(path, settings.pop("data", None)) or _relative(path, (data.get("finetune") or {}).get("data"))
                or _relative(path, data.get("labelled_data")))
    model = _model_ref(path, settings.pop("model", None))
    if settings.get("split_file") is not None:
        settings["split_file"] = _relative(path, settings["split_file"])
    return dataclass_from_dict(EvaluateConfig, settings, f"{path}: evaluate"), data_dir, model


def _evaluate(path: Path, data: dict[str, Any], result: PipelineResult) -> dict[str, Any]:
    from gsd_wsi.stages.evaluate import run_evaluate

    config, data_dir, model = _evaluate_settings(path, data)
    data_dir, model = data_dir or result.labels_dir, model or result.finetune_dir
    if data_dir is None or model is None:
        raise ConfigError(f"{path}: evaluate needs data and a model (evaluate.data, evaluate.model or a finetune section)")
    return run_evaluate(data_dir, model, result.out_dir / "evaluate", config)


def check_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Every section's settings validated, without running anything (ConfigError if not)."""
    path = Path(path)
    data = load_pipeline(path, overrides)
    tile = _tile_config(path, data["tile"]) if data.get("tile") is not None else TileConfig()
    segment = _segment_settings(path, data.get("segment"))
    _cohort_config(path, data, ("tile",), tile, segment[0] if segment else SegmentConfig(), False)
    for i, entry in enumerate(data.get("synthetic_slides") or []):
        _synthetic_spec(path, i, entry)
    _slide_entries(path, data)
    if data.get("labels") is not None:
        check_keys(f"{path}: labels", dict(data["labels"]), _LABEL_KEYS)
    if data.get("pretrain") is not None:
        _pretrain_settings(path, data["pretrain"])
    if data.get("finetune") is not None:
        _finetune_settings(path, data["finetune"], data)
    if data.get("evaluate") is not None:
        _evaluate_settings(path, data)
    return data
