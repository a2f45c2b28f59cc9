"""`gsd-wsi segment`, one slide: tissue -> windows -> network -> stitched bands -> mask pyramids.

Per slide, into ``OUT/<slide_id>/`` (built under a temporary name, renamed when complete):

    mask.ome.zarr   OME-NGFF 0.4 image-label pyramid (with --probabilities, probabilities/)
    mask.tiff       tiled pyramidal palette TIFF (OpenSlide, QuPath, ASAP open every level)
    mask.geojson    one QuPath annotation per connected region of each class
    overlay.png     the thumbnail with the mask coloured over it
    summary.json    areas, counts, timings, the settings, the model and the version

With an instance model (``finetune --target contour``) the mask's classes are background and
the object, ``instances.ome.zarr`` holds every nucleus's id (uint32), ``mask.geojson`` one
QuPath detection per nucleus with its area and mean haematoxylin OD, and summary.json the
count and density of nuclei (gsd_wsi/stages/segment_instances.py).

The preprocessing comes from the model (its mpp, window, input range, stain method and
target); the stain source is fitted once per slide. Windows cover tissue only (plus a
margin), are read in threads ahead of the network and blended into row bands that go to
disk as they are finished, so memory depends on the slide's width, not its area.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gsd_wsi import __version__
from gsd_wsi.atomic import atomic_write_text, replace_dir, temporary_sibling
from gsd_wsi.errors import OutputError
from gsd_wsi.manifest import SlideInput, collect_inputs, default_slide_id
from gsd_wsi.masks import (
    DetectionWriter, InstancePyramidWriter, LabelPyramidWriter, class_colors, label_levels, open_label_level,
    render_overlay, write_geojson, write_pyramidal_tiff,
)
from gsd_wsi.progress import NullProgress, Progress
from gsd_wsi.qc import save_png
from gsd_wsi.slide import Slide, open_slide
from gsd_wsi.stain import lut_pays_off
from gsd_wsi.stages.batch import BatchRun, Status
from gsd_wsi.stages.segment_instances import InstanceSink
from gsd_wsi.stages.segment_config import SegmentConfig, segment_settings_hash, tissue_thumb_mpp
from gsd_wsi.stages.segment_model import ModelChoice, SegmentationModel
from gsd_wsi.stages.segment_windows import MaskFrame, WindowReader, mask_frame, plan_windows
from gsd_wsi.stitch import BandStitcher, stride_for_overlap
from gsd_wsi.tissue import check_brightfield, detect_tissue
from gsd_wsi.zoo import DEFAULT_FAMILY

logger = logging.getLogger(__name__)

MASK_ZARR, MASK_TIFF, MASK_GEOJSON, OVERLAY_PNG, SUMMARY_JSON = (
    "mask.ome.zarr", "mask.tiff", "mask.geojson", "overlay.png", "summary.json")
INSTANCES_ZARR = "instances.ome.zarr"  # an instance model's (finetune --target contour) nuclei
_OVERLAY_LONG_SIDE_PX = 1600
_OVERLAY_MIN_SIDE_PX = 1000
_SLIDE_CACHE_BYTES = 8 << 20


@dataclass(frozen=True)
class SegmentResult:
    slide_id: str
    path: Path
    status: Status
    seconds: float = 0.0
    error: str = ""
    n_windows: int = 0
    tissue_mm2: float = 0.0
    class_mm2: dict[str, float] = field(default_factory=dict)
    nuclei: dict[str, Any] | None = None    # an instance model's count and density (summary.json "nuclei")

    @classmethod
    def failed(cls, item: SlideInput, error: str) -> SegmentResult:
        return cls(item.slide_id, item.path, "failed", error=error)

    def summary_row(self) -> dict[str, Any]:
        return {"slide_id": self.slide_id, "path": str(self.path), "status": self.status,
                "tissue_mm2": f"{self.tissue_mm2:.4f}",
                **{f"{name}_mm2": f"{area:.4f}" for name, area in self.class_mm2.items()},
                **({"nuclei": self.nuclei["count"], "nuclei_per_mm2": _fmt(self.nuclei["per_mm2_tissue"])}
                   if self.nuclei else {}),
                "n_windows": self.n_windows, "seconds": f"{self.seconds:.2f}", "error": self.error}

    def describe(self) -> str:
        areas = ", ".join(f"{name} {area:.3g} mm^2" for name, area in self.class_mm2.items())
        counted = (f", {self.nuclei['count']:,} nuclei ({_fmt(self.nuclei['per_mm2_tissue'])} per mm^2 of tissue)"
                   if self.nuclei else "")
        return f"{self.n_windows} windows" + (f", {areas}" if areas else "") + counted


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def read_summary(slide_dir: Path) -> dict[str, Any] | None:
    """A finished slide's summary.json, or None."""
    try:
        return json.loads((Path(slide_dir) / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        return None


class _OffTissue:
    """Which mask pixels of a band lie off tissue (or were reached by no window): background
    in every output, whichever sink receives the band."""

    def __init__(self, frame: MaskFrame, tissue: np.ndarray, thumb_scale_xy: tuple[float, float]) -> None:
        self.tissue = tissue
        sx, sy = thumb_scale_xy
        d = frame.downsample
        # tissue pixel under each mask pixel's centre
        self._cols = np.minimum(((np.arange(frame.width_px) + 0.5) * d / sx).astype(np.int64), tissue.shape[1] - 1)
        self._row_scale = d / sy

    def __call__(self, y0: int, weight: np.ndarray) -> np.ndarray:
        """Off-tissue pixels of rows ``y0 ..`` (as many as ``weight`` has)."""
        rows = weight.shape[0]
        thumb_rows = np.minimum(((np.arange(y0, y0 + rows) + 0.5) * self._row_scale).astype(np.int64),
                                self.tissue.shape[0] - 1)
        outside = ~self.tissue[thumb_rows[:, None], self._cols[None, :]]
        outside |= weight <= 0
        return outside


class _BandSink:
    """Receives stitched bands: argmax, background outside tissue, areas, then to disk.

    Bands of labels (uint8) are gathered into whole rows of zarr chunks before they are
    written, so the float bands can be thin while the chunks stay large (fewer files)."""

    def __init__(self, writer: LabelPyramidWriter, frame: MaskFrame, outside: _OffTissue, n_classes: int,
                 probabilities: bool, chunk_px: int) -> None:
        self.writer, self.n_classes, self.probabilities, self.chunk_px = writer, n_classes, probabilities, chunk_px
        self.outside = outside
        self._height = frame.height_px
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_y0 = 0
        self.counts = np.zeros(n_classes, np.int64)
        self.seconds = 0.0

    def __call__(self, y0: int, blended: np.ndarray, weight: np.ndarray) -> None:
        started = time.perf_counter()
        rows = blended.shape[1]
        outside = self.outside(y0, weight)
        labels = _argmax_uint8(blended)
        labels[outside] = 0
        self.counts += np.bincount(labels.ravel(), minlength=self.n_classes)[: self.n_classes]
        probs = None
        if self.probabilities:
            probs = np.rint(blended * 255.0).astype(np.uint8)
            probs[:, outside] = 0
            probs[0][outside] = 255
        if not self._pending:
            self._pending_y0 = y0
        self._pending.append((labels, probs))
        end = y0 + rows
        if end - self._pending_y0 >= self.chunk_px or end >= self._height:
            self._write()
        self.seconds += time.perf_counter() - started

    def _write(self) -> None:
        labels = np.concatenate([p[0] for p in self._pending], axis=0)
        probs = None if not self.probabilities else np.concatenate([p[1] for p in self._pending], axis=1)  # type: ignore[misc]
        self.writer.write_band(self._pending_y0, labels, probs)
        self._pending.clear()


def _argmax_uint8(values: np.ndarray) -> np.ndarray:
    """``argmax`` over axis 0 as uint8 (first index on ties, as numpy's), without numpy's
    int64 index array: a band of a wide slide is tens of MB less."""
    labels = np.zeros(values.shape[1:], np.uint8)
    best = values[0].copy()
    for c in range(1, values.shape[0]):
        better = values[c] > best
        labels[better] = c
        np.maximum(best, values[c], out=best)
    return labels


def _fit_stains(reader: WindowReader, mask_xy: np.ndarray, own_tissue: np.ndarray, n_sample: int) -> None:
    """Fit the reader's stain source ONCE per slide, from windows spread across its tissue."""
    normaliser = reader.normaliser
    if normaliser.method == "none" or not len(mask_xy):
        return
    candidates = np.flatnonzero(own_tissue >= 0.5)
    if not len(candidates):
        candidates = np.flatnonzero(own_tissue > 0)
    picks = candidates[np.unique(np.linspace(0, len(candidates) - 1, min(n_sample, len(candidates))).round().astype(int))]
    normaliser.fit_source(reader.read(mask_xy[picks], normalise=False))
    if reader.stain_table:  # build it once, before the readers share it
        normaliser.transform(np.zeros((1, 1, 3), np.uint8))


def segment_slide(slide_path: str | Path, model: SegmentationModel | ModelChoice | str | Path, out_dir: str | Path,
                  config: SegmentConfig = SegmentConfig(), slide_id: str | None = None, slide_mpp: float | None = None,
                  overwrite: bool = False, progress: Progress | None = None,
                  slide_dir: Path | None = None) -> SegmentResult:
    """Segment one slide into ``out_dir/<slide_id>/`` (or ``slide_dir`` when given); returns
    its result (raises on failure).

    ``model`` is a loaded :class:`SegmentationModel`, the folder `gsd-wsi finetune` wrote, a
    built-in model's name (``nuclei``: the member for the slide's resolution, gsd_wsi/zoo) or a
    :class:`ModelChoice` of one of those.
    A finished output with the same settings hash (model included) is kept (``skipped``); one
    made with another model or other settings is refused unless ``overwrite``.
    """
    started = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    slide_id = slide_id or default_slide_id(slide_path)
    progress = progress or NullProgress()
    choice = model if isinstance(model, ModelChoice) else ModelChoice(model, config.device, config.tta)
    final_dir = Path(slide_dir) if slide_dir is not None else out_dir / slide_id
    with open_slide(slide_path, mpp=slide_mpp, backend=config.backend) as slide:  # type: ignore[arg-type]
        model = choice.for_mpp(slide.mpp)
        assert model.mpp is not None
        digest = segment_settings_hash(config, model.digest, slide.mpp, slide_path.stat().st_size)
        existing = read_summary(final_dir)
        if final_dir.exists() and not overwrite:
            if existing is not None and existing.get("settings_hash") == digest:
                return SegmentResult(slide_id, slide_path, "skipped", n_windows=int(existing.get("n_windows", 0)),
                                     tissue_mm2=float(existing.get("tissue_mm2", 0.0)),
                                     class_mm2=dict(existing.get("class_mm2", {})), nuclei=existing.get("nuclei"))
            what = "another model or other settings" if existing is not None else "files not made by segment"
            raise OutputError(f"{final_dir} holds {what}; use --overwrite to replace it, or another -o")
        frame = mask_frame(slide, model.mpp)
        width0, height0 = slide.dimensions
        thumb_mpp = tissue_thumb_mpp(config, width0 * height0 * slide.mpp**2)
        if thumb_mpp > config.tissue.thumb_mpp:
            logger.info("%s: tissue detected at %.3g um/px (a thumbnail of at most %g Mpx)", slide_id, thumb_mpp,
                        config.tissue_max_mpx)
        thumb, thumb_scale = slide.thumbnail(thumb_mpp)
        check_brightfield(thumb, slide_id)
        slide.limit_cache(_SLIDE_CACHE_BYTES)  # this handle only reads thumbnails; windows have their own
        thumb_mpp_xy = (slide.mpp * thumb_scale[0], slide.mpp * thumb_scale[1])
        tissue = detect_tissue(thumb, (thumb_mpp_xy[0] + thumb_mpp_xy[1]) / 2,
                               dataclasses.replace(config.tissue, thumb_mpp=thumb_mpp))
        stride = stride_for_overlap(model.patch_px, config.overlap)
        mask_xy, own_tissue = plan_windows(frame, tissue, thumb_scale, model.patch_px, stride,
                                           config.tissue_margin_windows)
        tmp_dir = temporary_sibling(final_dir)
        tmp_dir.mkdir(parents=True)
        try:
            reader = WindowReader(slide_path, slide.mpp, slide.backend, frame, model.patch_px, model.normaliser(),
                                  config.workers, stain_table=lut_pays_off(len(mask_xy) * model.patch_px**2),
                                  haematoxylin=model.finds_instances)
            try:
                _fit_stains(reader, mask_xy, own_tissue, config.stain_sample_windows)
                progress.slide_started(slide_id, len(mask_xy))
                timing = _infer(reader, model, frame, tissue, thumb_scale, mask_xy, config, tmp_dir, progress,
                                slide.bounds_l0_xy)
            finally:
                reader.close()
            summary = _write_outputs(slide, slide_path, slide_id, model, frame, thumb, tissue, thumb_mpp_xy,
                                     mask_xy, config, digest, tmp_dir, timing, started)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    replace_dir(tmp_dir, final_dir)
    status: Status = "ok" if len(mask_xy) else "no_tissue"
    if status == "no_tissue":
        logger.warning("%s: no tissue found; wrote an empty mask", slide_id)
    return SegmentResult(slide_id, slide_path, status, time.perf_counter() - started, n_windows=len(mask_xy),
                         tissue_mm2=summary["tissue_mm2"], class_mm2=summary["class_mm2"], nuclei=summary.get("nuclei"))


def _infer(reader: WindowReader, model: SegmentationModel, frame: MaskFrame, tissue: np.ndarray,
           thumb_scale: tuple[float, float], mask_xy: np.ndarray, config: SegmentConfig, tmp_dir: Path,
           progress: Progress, slide_bounds_l0_xy: tuple[float, float]) -> dict[str, Any]:
    """Windows through the network into the stitcher, bands to the zarr pyramid's level 0 (an
    instance model's also to the instance pyramid and the detections, gsd_wsi/stages/segment_instances.py)."""
    classes = model.mask_classes
    colors = class_colors(len(classes))
    metadata = {"frame": frame.to_dict(), "model": str(model.folder), "model_digest": model.digest,
                "gsd_wsi_version": __version__}
    writer = LabelPyramidWriter(tmp_dir / MASK_ZARR, frame.width_px, frame.height_px, frame.mpp, classes, colors,
                                band_px=config.chunk_px,
                                n_probability_channels=len(classes) if config.probabilities else None, metadata=metadata)
    outside = _OffTissue(frame, tissue, thumb_scale)
    with contextlib.ExitStack() as stack:
        sink: _BandSink | InstanceSink
        if model.finds_instances:
            postprocess = model.postprocess()
            assert postprocess is not None  # always recorded for an instance model
            instance_writer = InstancePyramidWriter(tmp_dir / INSTANCES_ZARR, frame.width_px, frame.height_px,
                                                    frame.mpp, classes[1], band_px=config.chunk_px,
                                                    metadata=metadata | {"postprocess": postprocess.to_dict()})
            detections = stack.enter_context(DetectionWriter(
                tmp_dir / MASK_GEOJSON, classes[1], colors[1], frame.mpp, frame.downsample, slide_bounds_l0_xy,
                config.min_area_um2))
            sink = InstanceSink(frame.width_px, frame.height_px, frame.mpp, model.n_classes, postprocess, outside,
                                writer, instance_writer, detections, config.probabilities, config.chunk_px)
        else:
            sink = _BandSink(writer, frame, outside, model.n_classes, config.probabilities, config.chunk_px)
        n_channels = model.n_classes + (1 if model.finds_instances else 0)  # + haematoxylin OD
        stitcher = BandStitcher(frame.width_px, frame.height_px, n_channels, model.patch_px, sink,
                                band_px=config.band_px, weights=config.weights)
        wait_s = network_s = stitch_s = 0.0
        t0 = time.perf_counter()
        mark = t0
        for xy, windows, od in reader.batches(mask_xy, config.batch_size):
            now = time.perf_counter()
            wait_s += now - mark
            probabilities = model.predict(windows)
            mark = time.perf_counter()
            network_s += mark - now
            before = sink.seconds
            if od is not None:
                probabilities = np.concatenate([probabilities, od[:, None]], axis=1)
            stitcher.add_batch(probabilities, xy)
            stitch_s += time.perf_counter() - mark - (sink.seconds - before)
            mark = time.perf_counter()
            progress.tiles_done(len(xy))
        stitcher.finish()
        if isinstance(sink, InstanceSink):
            sink.finish()
            instance_writer.finish()
        info = writer.finish()
    total = time.perf_counter() - t0
    timing: dict[str, Any] = {
        "inference_s": total, "network_s": network_s, "reader_wait_s": wait_s, "stitch_s": stitch_s,
        "band_write_s": sink.seconds, "reader_busy_s": reader.read_seconds,
        "class_px": sink.counts.tolist(), "levels": [list(s) for s in info.level_shapes]}
    if isinstance(sink, InstanceSink):
        timing["instances"] = sink
        timing["geojson"] = detections.summary()
    return timing


def _write_outputs(slide: Slide, slide_path: Path, slide_id: str, model: SegmentationModel, frame: MaskFrame,
                   thumb: np.ndarray, tissue: np.ndarray, thumb_mpp_xy: tuple[float, float], mask_xy: np.ndarray,
                   config: SegmentConfig, digest: str, tmp_dir: Path, timing: dict[str, Any],
                   started: float) -> dict[str, Any]:
    classes = model.mask_classes
    colors = class_colors(len(classes))
    zarr_path = tmp_dir / MASK_ZARR
    t0 = time.perf_counter()
    write_pyramidal_tiff(zarr_path, tmp_dir / MASK_TIFF, frame.mpp, colors, tile_px=config.tiff_tile_px)
    t1 = time.perf_counter()
    instances: InstanceSink | None = timing.pop("instances", None)
    if instances is None:
        features = write_geojson(zarr_path, tmp_dir / MASK_GEOJSON, classes, colors, frame.mpp, frame.downsample,
                                 slide.bounds_l0_xy, config.min_area_um2, config.geojson_chunk_px)
    else:  # the detections were written while the nuclei were found
        features = timing.pop("geojson")
    t2 = time.perf_counter()
    _write_overlay(slide, thumb, zarr_path, model, colors, tmp_dir / OVERLAY_PNG, slide_id, digest)
    t3 = time.perf_counter()
    px_mm2 = (frame.mpp / 1000.0) ** 2
    class_mm2 = {name: float(n) * px_mm2 for name, n in zip(classes[1:], timing.pop("class_px")[1:])}
    tissue_mm2 = float(tissue.sum()) * thumb_mpp_xy[0] * thumb_mpp_xy[1] / 1e6
    tissue_mpx = tissue_mm2 / px_mm2 / 1e6
    seconds = time.perf_counter() - started
    inference_s = timing["inference_s"]
    summary = {
        "slide_id": slide_id, "slide": {"path": str(slide_path.resolve()), "mpp": slide.mpp,
                                        "dimensions": list(slide.dimensions), "bounds_l0_xy": list(slide.bounds_l0_xy),
                                        "reader": slide.backend},
        "model": {"path": str(model.folder.resolve()), "digest": model.digest, "classes": model.classes,
                  "target": model.target,
                  "mpp": model.mpp, "patch_px": model.patch_px, "input_range": list(model.input_range),
                  "stain": model.stain.get("method", "none")},
        "mask": frame.to_dict() | {"levels": timing.pop("levels")},
        "class_mm2": class_mm2, "tissue_mm2": tissue_mm2, "n_windows": len(mask_xy),
        "geojson": features,
        **({"nuclei": instances.summary(tissue_mm2), "instances": INSTANCES_ZARR} if instances is not None else {}),
        "seconds": seconds, "windows_per_s": len(mask_xy) / inference_s if inference_s > 0 else None,
        "tissue_mpx_per_s": tissue_mpx / seconds if seconds > 0 else None,
        "timing_s": timing | {"tiff_s": t1 - t0, "geojson_s": t2 - t1, "overlay_s": t3 - t2},
        "device": str(model.device), "settings": config.to_dict(), "settings_hash": digest,
        "gsd_wsi_version": __version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(tmp_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    return summary


def _overlay_thumbnail(slide: Slide) -> np.ndarray:
    """About 1000-1600 px along the long side, from the coarsest level that has as many pixels
    (decoding a finer level for a picture costs seconds on a large slide)."""
    l0_long = max(slide.dimensions)
    usable = [lv for lv in slide.levels if l0_long / lv.downsample >= _OVERLAY_MIN_SIDE_PX]
    level = max(usable, key=lambda lv: lv.downsample) if usable else slide.levels[0]
    target_mpp = max(slide.level_mpp(level.index), l0_long * slide.mpp / _OVERLAY_LONG_SIDE_PX)
    return slide.thumbnail(target_mpp)[0]


def _write_overlay(slide: Slide, thumb: np.ndarray, zarr_path: Path, model: SegmentationModel,
                   colors: list[tuple[int, int, int]], path: Path, slide_id: str, digest: str) -> None:
    """The thumbnail (about 1600 px long) with the mask over it, from the pyramid level nearest its size."""
    picture = thumb if max(thumb.shape[:2]) >= _OVERLAY_MIN_SIDE_PX else _overlay_thumbnail(slide)
    levels = label_levels(zarr_path)
    level = max((k for k, (h, w) in enumerate(levels) if max(h, w) >= max(picture.shape[:2])), default=0)
    labels = np.asarray(open_label_level(zarr_path, level)[:])
    instances_path = zarr_path.parent / INSTANCES_ZARR  # an instance model's: every nucleus outlined
    instances = np.asarray(open_label_level(instances_path, level)[:]) if instances_path.exists() else None
    text = {"Software": f"gsd-wsi {__version__}", "slide_id": slide_id, "settings_hash": digest, "model": str(model.folder)}
    save_png(path, render_overlay(picture, labels, model.mask_classes, colors, instances=instances), text)


def run_segment(sources: list[str | Path], out_dir: str | Path, model: str | Path | SegmentationModel | None,
                config: SegmentConfig = SegmentConfig(), overwrite: bool = False, slide_mpp: float | None = None,
                progress: Progress | None = None) -> list[SegmentResult]:
    """Segment every slide in ``sources`` (files, folders, CSV manifests) into ``out_dir``.

    ``model`` None is the built-in nuclei model (the member for each slide's resolution). Each
    model is loaded once. Returns one result per input, in input order; a slide's
    failure is recorded in its result and in ``OUT/segment_summary.csv``, never raised.
    """
    choice = ModelChoice(DEFAULT_FAMILY if model is None else model, config.device, config.tta)
    inputs = collect_inputs(list(sources), slide_mpp)
    logger.info("segmenting %d slide(s) with %s", len(inputs), choice.describe())
    own: dict[str, ModelChoice] = {}  # a manifest's model column: that slide's own model, loaded once

    def model_for(item: SlideInput) -> ModelChoice:
        if item.model is None:
            return choice
        if item.model not in own:
            own[item.model] = ModelChoice(item.model, config.device, config.tta)
        return own[item.model]

    with BatchRun(Path(out_dir), inputs, "segment", SegmentResult.failed, progress) as batch:
        batch.run_each(lambda item: segment_slide(item.path, model_for(item), out_dir, config, item.slide_id, item.mpp,
                                                  overwrite, progress))
    return batch.results  # type: ignore[return-value]
