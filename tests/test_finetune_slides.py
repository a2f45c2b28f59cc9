"""`finetune` on whole slides with QuPath GeoJSON: areas read once, ROIs and ignore, and the round
trip segment -> GeoJSON edited as a pathologist would -> finetune."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from rasterio.features import shapes
from rasterio.transform import Affine
from shapely.geometry import box, shape

from gsd_wsi.datasets import DatasetError
from gsd_wsi.datasets.qupath import read_qupath_geojson
from gsd_wsi.datasets.slide_labels import sort_annotations
from gsd_wsi.stages.finetune import FinetuneConfig, run_finetune
from gsd_wsi.synthetic import SyntheticSlide, SyntheticSlideSpec, write_synthetic_slide
from gsd_wsi.targets import IGNORE

MPP = 4.0  # the model's resolution: 8 level-0 pixels of the 0.5 um/px slide per pixel
FAST = {"model": "tiny", "epochs": 1, "patch_px": 64, "batch_size": 4, "crops_per_image": 2, "train_mpp": MPP,
        "loss": "dice+ce", "lr": 1e-3, "val_fraction": 0.0}


def rect_feature(box: tuple[float, float, float, float], cls: str, name: str | None = None) -> dict[str, Any]:
    x0, y0, x1, y1 = box
    properties: dict[str, Any] = {"objectType": "annotation", "classification": {"name": cls, "color": [0, 0, 255]}}
    if name:
        properties["name"] = name
    return {"type": "Feature", "properties": properties,
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}


def gland_features(slide: SyntheticSlide) -> list[dict[str, Any]]:
    """The drawn glands as QuPath annotations of class Gland (level-0 pixels)."""
    cells = slide.gland_mask.astype(np.uint8)
    return [{"type": "Feature", "geometry": geometry,
             "properties": {"objectType": "annotation", "classification": {"name": "Gland", "color": [255, 0, 0]}}}
            for geometry, _ in shapes(cells, mask=cells > 0, transform=Affine.scale(slide.mask_downsample))]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSlide, Path]:
    folder = tmp_path_factory.mktemp("annotated")
    slide = write_synthetic_slide(folder / "glands.tiff",
                                  SyntheticSlideSpec(width_px=4096, height_px=3072, mpp=0.5, fmt="tiff", seed=7))
    features = [rect_feature((0, 0, 2048, 1536), "Region*", "top-left"),
                rect_feature((2048, 1536, 4096, 3072), "Region*", "bottom-right"), *gland_features(slide)]
    path = folder / "glands.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return slide, path


@pytest.fixture(scope="module")
def slide_run(annotated: tuple[SyntheticSlide, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    slide, _ = annotated  # glands.geojson beside the slide: found by name
    run = tmp_path_factory.mktemp("run") / "run"
    run_finetune([slide.path], run, FinetuneConfig(**FAST | {"epochs": 2}), None)
    return run


def test_finetune_on_a_slide_reads_its_areas_once(slide_run: Path, annotated: tuple[SyntheticSlide, Path],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    slide, geojson = annotated
    saved = json.loads((slide_run / "config.json").read_text())
    assert saved["finetune"]["class_names"] == ["background", "Gland"] and saved["finetune"]["mpp"] == MPP
    assert saved["data"]["slides"]["glands"]["annotations"] == str(geojson)
    assert set(saved["split"]["train"]) >= {"top-left", "bottom-right"}
    info = json.loads((slide_run / "model" / "model.json").read_text())
    assert info["classes"] == ["background", "Gland"] and info["mpp"] == MPP
    store = zarr.open_group(slide_run / "labelled" / "glands.zarr", mode="r")
    classes = np.asarray(store["0/classes"])  # the top-left ROI: 256 x 192 pixels at 4 um/px, all labelled,
    assert classes.shape == (256, 256) and classes[:192].min() == 0 and classes.max() == 1  # grown to 256 rows
    assert (classes[192:] == IGNORE).mean() > 0.5  # with context below it that carries no label
    with caplog.at_level(logging.INFO):  # again: the store, not the slide
        run_finetune([slide.path], slide_run, FinetuneConfig(**FAST), None, overwrite=True, annotations=geojson)
    assert "labelled area(s) from" in caplog.text


def test_a_missing_annotation_file_fails_that_slide_alone(annotated: tuple[SyntheticSlide, Path], tmp_path: Path) -> None:
    slide, geojson = annotated
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,slide_id,annotations\n{slide.path},glands,{geojson}\n{slide.path},again,missing.geojson\n")
    run_finetune([manifest], tmp_path / "run", FinetuneConfig(**FAST), None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert len(saved["problems"]) == 1 and "again" in saved["problems"][0]
    manifest.write_text(f"path,slide_id,annotations\n{slide.path},glands,missing.geojson\n")
    with pytest.raises(DatasetError, match="no annotated slide"):
        run_finetune([manifest], tmp_path / "run2", FinetuneConfig(**FAST), None)


def test_round_trip_segment_edit_finetune(slide_run: Path, annotated: tuple[SyntheticSlide, Path], tmp_path: Path) -> None:
    """segment's GeoJSON lands on its own mask's pixels; a pathologist's edits (delete, add, move,
    reclassify) are what the next fine-tuning learns from."""
    from gsd_wsi.stages.segment import SegmentConfig, segment_slide

    slide, _ = annotated
    result = segment_slide(slide.path, slide_run, tmp_path / "seg", SegmentConfig(batch_size=16))
    out = tmp_path / "seg" / "glands"
    written = json.loads((out / "mask.geojson").read_text())["features"]
    assert result.status == "ok" and len(written) >= 3, "the segment model finds regions to edit"
    from gsd_wsi.masks import open_label_level

    level0 = np.asarray(open_label_level(out / "mask.ome.zarr", 0))
    roi = rect_feature((0, 0, 4096, 3072), "Region*", "all")
    features, _ = read_qupath_geojson(_write(tmp_path / "back.geojson", [roi, *written]))
    labels = sort_annotations(features, "glands", (4096, 3072), (0, 0), ("background", "Gland"), "back.geojson")
    classes, _ = labels.label_maps((0, 0, level0.shape[1], level0.shape[0]), MPP / 0.5)
    assert np.array_equal(classes, level0.astype(np.int16)), "the round trip lands on the same pixels"

    # the pathologist's edits: one region deleted, one moved, one reclassified, one drawn where none was
    deleted, moved, renamed = written[:3]
    shift = 400.0
    moved_copy = json.loads(json.dumps(moved))
    moved_copy["geometry"]["coordinates"] = [[[x + shift, y] for x, y in ring] for ring in moved["geometry"]["coordinates"]]
    renamed_copy = json.loads(json.dumps(renamed))
    renamed_copy["properties"]["classification"] = {"name": "Tumour", "color": [0, 200, 0]}
    outlines = [shape(f["geometry"]) for f in written]
    empty = next(b for b in (box(x, y, x + 400, y + 400) for y in range(0, 2672, 400) for x in range(0, 3696, 400))
                 if not any(b.intersects(o) for o in outlines))
    added = rect_feature(empty.bounds, "Gland")
    edited = _write(tmp_path / "edited.geojson", [roi, *written[3:], moved_copy, renamed_copy, added])
    run = tmp_path / "again"
    run_finetune([slide.path], run, FinetuneConfig(**FAST), None, annotations=edited)
    assert json.loads((run / "model" / "model.json").read_text())["classes"] == ["background", "Gland", "Tumour"]
    learnt = np.asarray(zarr.open_group(run / "labelled" / "glands.zarr", mode="r")["0/classes"])
    d = MPP / 0.5

    def label_at(point: Any) -> int:
        return int(learnt[int(point.y // d), int(point.x // d)])

    drawn_now = [shape(f["geometry"]) for f in (*written[3:], moved_copy, renamed_copy, added)]
    gone = shape(deleted["geometry"]).representative_point()
    assert label_at(gone) == (1 if any(o.contains(gone) for o in drawn_now) else 0)
    assert label_at(shape(renamed_copy["geometry"]).representative_point()) == 2
    assert label_at(shape(moved_copy["geometry"]).representative_point()) in (1, 2)
    assert label_at(empty.centroid) == 1
    assert learnt.min() >= 0  # the ROI covers the slide: every pixel labelled


def _write(path: Path, features: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_evaluate_on_a_slide_scores_within_the_labelled_areas(slide_run: Path, annotated: tuple[SyntheticSlide, Path],
                                                               tmp_path: Path) -> None:
    from gsd_wsi.stages.evaluate import EvaluateConfig, run_evaluate

    slide, geojson = annotated
    result = run_evaluate([slide.path], slide_run, tmp_path / "eval", EvaluateConfig(batch_size=16), annotations=geojson)
    names = [row.split(",")[0] for row in (tmp_path / "eval" / "per_image.csv").read_text().splitlines()[1:]]
    assert "top-left" in names and "bottom-right" in names and result["per_slide"]["glands"]["n_true"]["n"] == len(names)
    assert (tmp_path / "eval" / "overlays" / "top-left.png").is_file()
    # an object drawn outside every ROI counts; what lies outside every labelled area does not: a
    # file with the ROIs alone scores no gland anywhere, whatever the model predicts outside them
    rois = [f for f in json.loads(geojson.read_text())["features"] if f["properties"]["classification"]["name"] == "Region*"]
    only_rois = _write(tmp_path / "rois.geojson", rois)
    bare = run_evaluate([slide.path], slide_run, tmp_path / "bare", EvaluateConfig(batch_size=16), annotations=only_rois)
    assert bare["n_images"] == 2 and bare["summary"]["n_true"]["mean"] == 0
    with pytest.raises(Exception, match="reference"):
        run_evaluate([slide.path], slide_run, tmp_path / "ref", EvaluateConfig(protocol="reference"), annotations=geojson)
