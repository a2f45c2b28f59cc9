"""QuPath GeoJSON on slides: reading as QuPath writes it, what is labelled, label maps, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gsd_wsi.datasets import DatasetError
from gsd_wsi.datasets.qupath import read_qupath_geojson
from gsd_wsi.datasets.slide_labels import mask_box, sort_annotations
from gsd_wsi.targets import IGNORE


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[list[float]]]:
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def feature(coordinates: Any, cls: str | None, kind: str = "Polygon", object_type: str = "annotation",
            name: str | None = None, **extra: Any) -> dict[str, Any]:
    properties: dict[str, Any] = {"objectType": object_type}
    if cls is not None:
        properties["classification"] = {"name": cls, "color": [255, 0, 0]}
    if name is not None:
        properties["name"] = name
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coordinates}, "properties": properties, **extra}


def write(path: Path, features: list[dict[str, Any]], collection: bool = True) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features} if collection else features))
    return path


def test_reads_collections_arrays_cells_and_skips_points(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cell = feature(rect(0, 0, 40, 40), "Nucleus", object_type="cell",
                   nucleusGeometry={"type": "Polygon", "coordinates": rect(10, 10, 20, 20)})
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}}
    features = [feature(rect(0, 0, 100, 100), "Region*", name="roi-a"), cell, point,
                feature([rect(200, 200, 210, 210), rect(300, 300, 320, 320)], "Nucleus", kind="MultiPolygon")]
    with caplog.at_level(logging.WARNING):
        from_collection, report = read_qupath_geojson(write(tmp_path / "a.geojson", features))
    from_array, _ = read_qupath_geojson(write(tmp_path / "b.geojson", features, collection=False))
    assert [f.class_name for f in from_collection] == ["Region*", "Nucleus", "Nucleus"]
    assert [f.index for f in from_array] == [0, 1, 3]
    assert from_collection[0].name == "roi-a"
    assert from_collection[1].geometry.area == 100  # the cell's nucleus, not its outline
    assert report.skipped == {"Point geometry (no area)": 1}
    assert "skipped" in caplog.text


def test_self_intersecting_ring_is_repaired_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bowtie = [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]
    with caplog.at_level(logging.WARNING):
        features, report = read_qupath_geojson(write(tmp_path / "a.geojson", [feature(bowtie, "Nucleus")]))
    assert report.repaired == 1 and features[0].geometry.is_valid
    assert features[0].geometry.area == pytest.approx(50)
    assert "1 self-intersecting" in caplog.text


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty file"),
    ('{"type": "FeatureCollection",\n "features": [\n  {"type": "Feature",,}]}', "line 3"),
    ('{"type": "Topology"}', "expected a GeoJSON FeatureCollection"),
    ('[1, 2]', "feature 0 is a int"),
])
def test_bad_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message) as info:
        read_qupath_geojson(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def sorted_from(tmp_path: Path, features: list[dict[str, Any]], classes: tuple[str, ...] = ("background", "Nucleus"),
                slide_wh: tuple[int, int] = (1000, 800), bounds: tuple[int, int] = (0, 0)) -> Any:
    read, _ = read_qupath_geojson(write(tmp_path / "s.geojson", features))
    return sort_annotations(read, "s1", slide_wh, bounds, classes, "s.geojson")


def test_roi_background_objects_ignore_and_later_wins(tmp_path: Path) -> None:
    features = [feature(rect(0, 0, 100, 100), "Region*", name="r1"),
                feature(rect(10, 10, 30, 30), "Nucleus"),
                feature(rect(20, 20, 40, 40), None),  # unclassified: the one object class; later wins
                feature(rect(60, 60, 80, 80), "Ignore*"),
                feature(rect(500, 500, 520, 520), "Nucleus")]  # outside every ROI: its own area
    labels = sorted_from(tmp_path, features)
    assert [a.name for a in labels.areas] == ["r1", "s1#2"]
    classes, instances = labels.label_maps((0, 0, 100, 100), 1.0)
    assert classes[5, 5] == 0 and classes[15, 15] == 1 and classes[70, 70] == IGNORE
    assert instances[15, 15] == 1 and instances[25, 25] == 2 and instances[35, 35] == 2  # the later object wins
    assert instances[70, 70] == 0 and (classes[:, :] != IGNORE).sum() == 100 * 100 - 20 * 20
    classes, instances = labels.label_maps((490, 490, 40, 40), 1.0)  # outside the ROI: only the object
    assert classes[0, 0] == IGNORE and classes[15, 15] == 1 and instances.max() == 1


def test_multipolygon_holes_and_pixel_centres_at_a_coarser_lattice(tmp_path: Path) -> None:
    ring = [[[0, 0], [40, 0], [40, 40], [0, 40], [0, 0]], [[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]]
    features = [feature(rect(0, 0, 100, 100), "Region*"),
                feature([ring, rect(60, 60, 62, 62)], "Nucleus", kind="MultiPolygon")]
    classes, instances = sorted_from(tmp_path, features).label_maps((0, 0, 50, 50), 2.0)  # 2 level-0 px per pixel
    assert classes[10, 10] == 0 and classes[2, 2] == 1  # the hole is background; the ring is the object
    assert instances[2, 2] == instances[30, 30] == 1  # both parts: one instance
    assert classes[31, 31] == 0  # pixel (31, 31) covers level-0 62..64: its centre (63, 63) is outside


def test_bounds_offset_moves_the_file_onto_level_zero(tmp_path: Path) -> None:
    features = [feature(rect(0, 0, 50, 50), "Region*"), feature(rect(10, 10, 20, 20), "Nucleus")]
    labels = sorted_from(tmp_path, features, bounds=(300, 200))
    assert labels.areas[0].bounds_l0 == (300, 200, 350, 250)
    classes, _ = labels.label_maps((300, 200, 50, 50), 1.0)
    assert classes[15, 15] == 1 and classes[5, 5] == 0


def test_objects_beyond_the_edge_are_clipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    features = [feature(rect(0, 0, 990, 790), "Region*"), feature(rect(980, 780, 1020, 820), "Nucleus")]
    with caplog.at_level(logging.WARNING):
        labels = sorted_from(tmp_path, features)
    assert labels.clipped == 1 and labels.objects[0][1].bounds == (980, 780, 1000, 800)
    assert "clipped" in caplog.text


@pytest.mark.parametrize(("features", "message"), [
    ([feature(rect(2000, 2000, 3000, 3000), "Region*")], "another slide"),
    ([feature(rect(0, 0, 4000, 3200), "Region*")], "another level or scale"),
    ([feature(rect(0, 0, 10, 10), "Tumor"), feature(rect(0, 0, 10, 10), "Stroma")], "'Stroma', 'Tumor' are not among"),
    ([feature(rect(0, 0, 10, 10), "Ignore*")], "nothing is labelled"),
    ([feature(rect(0, 0, 10, 10), "Region*", name="a"), feature(rect(20, 20, 30, 30), "Region*", name="a")],
     "share the name"),
    ([], "no area objects"),
])
def test_refusals(tmp_path: Path, features: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        sorted_from(tmp_path, features)


def test_unclassified_objects_need_one_object_class(tmp_path: Path) -> None:
    features = [feature(rect(0, 0, 10, 10), "Tumor"), feature(rect(20, 20, 30, 30), None)]
    with pytest.raises(DatasetError, match="1 unclassified object"):
        sorted_from(tmp_path, features, classes=("background", "Tumor", "Stroma"))


def test_mask_box_grows_small_areas_for_context_within_the_slide() -> None:
    assert mask_box((10, 10, 30, 30), 1.0, 64, (1000, 1000)) == (0, 0, 64, 64)
    assert mask_box((500, 500, 510, 510), 2.0, 64, (1000, 1000)) == (220, 220, 64, 64)
    assert mask_box((0, 0, 400, 300), 2.0, 64, (1000, 1000)) == (0, 0, 200, 150)
    assert mask_box((990, 990, 1000, 1000), 1.0, 64, (1000, 1000)) == (936, 936, 64, 64)
