"""Instance-aware targets: touching nuclei stay apart, the band follows um and mpp, instance sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from gsd_wsi.datasets import discover, load_instance_example
from gsd_wsi.errors import ConfigError
from gsd_wsi.targets import (BACKGROUND, BOUNDARY, INTERIOR, boundary_px_at, contour_target, distance_target,
                             object_probabilities)


def _touching_discs(radius: int = 12, size: int = 64) -> np.ndarray:
    """Two discs of ``radius`` whose centres are ``2 * radius`` apart: they share a straight edge."""
    yy, xx = np.mgrid[:size, :size]
    instances = np.zeros((size, size), np.int32)
    cy, cx = size // 2, size // 2 - radius
    instances[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    right = (yy - cy) ** 2 + (xx - cx - 2 * radius) ** 2 <= radius**2
    instances[right & (instances == 0)] = 2
    return instances


def test_touching_instances_are_separated_by_boundary_pixels() -> None:
    instances = _touching_discs()
    assert ndi.label(instances > 0)[1] == 1  # one connected component: what semantic training learns
    for boundary_px in (1.0, 2.5, 4.0):
        target = contour_target(instances, boundary_px)
        assert target.dtype == np.uint8 and set(np.unique(target)) == {BACKGROUND, INTERIOR, BOUNDARY}
        assert np.array_equal(target > 0, instances > 0)  # the object is interior + boundary
        interiors, count = ndi.label(target == INTERIOR, structure=np.ones((3, 3)))  # even 8-connected
        assert count == 2
        assert {frozenset(np.unique(instances[interiors == i])) for i in (1, 2)} == {frozenset({1}), frozenset({2})}
        touching = (instances == 1) & (np.roll(instances, -1, axis=1) == 2)  # left disc's pixels at the shared edge
        assert touching.any() and (target[touching] == BOUNDARY).all()
        assert (target[np.roll(touching, 1, axis=1)] == BOUNDARY).all()  # and the right disc's


def test_band_width_follows_boundary_um_over_mpp() -> None:
    """A disc of radius 20 px: boundary where the distance to the outside is at most the band."""
    yy, xx = np.mgrid[:64, :64]
    radius_sq = (yy - 32) ** 2 + (xx - 32) ** 2
    instances = (radius_sq <= 20**2).astype(np.int32)
    for boundary_um, mpp in ((1.0, 0.25), (2.0, 0.25), (1.0, 0.5)):
        boundary_px = boundary_px_at(boundary_um, mpp)
        assert boundary_px == boundary_um / mpp
        target = contour_target(instances, boundary_px)
        distance = ndi.distance_transform_edt(instances)
        assert np.array_equal(target == BOUNDARY, (instances > 0) & (distance <= boundary_px))
        # along the row through the centre, the band is boundary_px pixels wide on each side
        row = target[32]
        assert (row == BOUNDARY).sum() == 2 * int(boundary_px)
    assert boundary_px_at(0.1, 0.25) == 1.0  # never thinner than the one pixel that separates
    with pytest.raises(ConfigError, match="--boundary-um must be a positive"):
        boundary_px_at(0.0, 0.25)


def test_a_thin_instance_keeps_its_innermost_pixels_and_the_image_border_is_no_edge() -> None:
    instances = np.zeros((40, 40), np.int32)
    instances[10:15, 5:30] = 1  # 5 px thick: thinner than an 8-px band
    instances[0:10, 32:40] = 2  # cut by the top and right image borders
    target = contour_target(instances, 8.0)
    assert (target[12, 7:28] == INTERIOR).all() and (target[10, 5:30] == BOUNDARY).all()
    assert target[0, 39] == INTERIOR  # the corner at the image border is deepest, not an edge
    assert (target[9, 32:40] == BOUNDARY).all() and (target[0:10, 32] == BOUNDARY).all()


def test_distance_target_is_one_at_each_centre_and_zero_on_background() -> None:
    instances = _touching_discs()
    distance = distance_target(instances)
    assert distance.dtype == np.float32 and distance[instances == 0].max() == 0
    for index in (1, 2):
        values = distance[instances == index]
        assert values.max() == pytest.approx(1.0) and 0 < values.min() < 0.2
    touching = (instances == 1) & (np.roll(instances, -1, axis=1) == 2)
    assert distance[touching].max() < 0.2  # the shared edge is an edge of both


def test_object_probabilities_merge_interior_and_boundary() -> None:
    probabilities = np.random.default_rng(0).dirichlet((1, 1, 1), size=(4, 4)).transpose(2, 0, 1)
    merged = object_probabilities(probabilities)
    assert merged.shape == (2, 4, 4) and np.allclose(merged.sum(0), 1)
    assert np.allclose(merged[1], probabilities[1] + probabilities[2])


def _write_folder(root: Path, mask: np.ndarray, xml: bool) -> Path:
    """images/ + masks/ (+ annotations/ with one square polygon per instance of ``mask`` when ``xml``)."""
    for sub in ("images", "masks", "annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*mask.shape, 3), 200, np.uint8)).save(root / "images" / "im.png")
    Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / "im.png")
    if xml:
        regions = []
        for index, box in enumerate(ndi.find_objects(mask), start=1):
            (y0, y1), (x0, x1) = (box[0].start, box[0].stop - 1), (box[1].start, box[1].stop - 1)
            vertices = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
            regions.append(f'<Region Id="{index}"><Vertices>{vertices}</Vertices></Region>')
        (root / "annotations" / "im.xml").write_text(
            f'<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>{"".join(regions)}'
            "</Regions></Annotation></Annotations>")
    return root


def test_instance_source_prefers_xml_then_mask_ids_then_connected_components(tmp_path: Path) -> None:
    ids = np.zeros((32, 32), np.int32)
    ids[8:16, 4:12], ids[8:16, 12:20] = 1, 2  # two touching squares
    binary = (ids > 0).astype(np.int32) * 255

    root = _write_folder(tmp_path / "xml", ids, xml=True)
    Image.fromarray(binary.astype(np.uint8)).save(root / "masks" / "im.png")  # the binary mask is not used
    image, instances, source = load_instance_example(discover(root)[0][0])
    assert source == "xml" and image.shape == (32, 32, 3)
    assert set(np.unique(instances)) == {0, 1, 2} and (instances[8:15, 4:11] == 1).all()

    item = discover(_write_folder(tmp_path / "ids", ids, xml=False))[0][0]
    _, instances, source = load_instance_example(item)
    assert source == "mask instance ids" and np.array_equal(instances, ids)

    item = discover(_write_folder(tmp_path / "binary", binary, xml=False))[0][0]
    _, instances, source = load_instance_example(item)
    assert source == "mask connected components" and np.array_equal(np.unique(instances), [0, 1])  # merged


def test_monuseg_binary_masks_merge_touching_nuclei_that_the_xml_keeps_apart(monuseg_dir: Path) -> None:
    """The measurement behind the source order: the PNG masks are binary, the XML has the instances."""
    items = {item.name: item for item in discover(monuseg_dir)[0]}
    with_xml = sorted(name for name, item in items.items() if item.xml_path is not None)
    assert len(with_xml) == 13 and len(items) == 30
    name = with_xml[0]
    _, from_xml, source = load_instance_example(items[name])
    assert source == "xml"
    mask = np.asarray(Image.open(items[name].mask_path))
    assert set(np.unique(mask)) <= {0, 1, 255}  # binary: no instance ids
    components = ndi.label(mask > 0)[1]
    assert components < len(np.unique(from_xml)) - 1  # fewer components than nuclei: touching ones merge
    target = contour_target(from_xml, boundary_px_at(2.0, 0.2527))
    assert ndi.label(target == INTERIOR)[1] >= len(np.unique(from_xml)) - 1 - 5  # ~one interior per nucleus
