"""Mask outputs: OME-Zarr label pyramid, pyramidal palette TIFF, QuPath GeoJSON, overlay.

Every output is read back with the reader its users have: ome-zarr-py for the pyramid,
OpenSlide (openslide-bin) for the TIFF, shapely for the GeoJSON.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import zarr
from scipy import ndimage as ndi
from shapely.geometry import shape

from gsd_wsi import __version__
from gsd_wsi.errors import MaskWriteError
from gsd_wsi.masks import (
    LabelPyramidWriter,
    class_colors,
    label_levels,
    mean_downsample_2x2,
    mode_downsample_2x2,
    open_label_level,
    pyramid_shapes,
    read_pyramid_info,
    render_overlay,
    write_geojson,
    write_pyramidal_tiff,
)

NAMES = ["background", "nucleus", "stroma", "tumour"]
COLOURS = class_colors(len(NAMES))
FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)


def _disc(mask: np.ndarray, cy: float, cx: float, radius: float, value: int) -> None:
    yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = value


def _synthetic_mask() -> np.ndarray:
    """1300 x 1100: discs, a ring with a hole, a bar crossing chunk seams, a U closing low,
    two pixels touching at a corner only, and a one-pixel speck."""
    mask = np.zeros((1300, 1100), np.uint8)
    _disc(mask, 200, 200, 90, 1)
    _disc(mask, 200, 500, 40, 1)
    _disc(mask, 650, 700, 220, 3)  # the ring: tumour with a stroma-free hole
    _disc(mask, 650, 700, 80, 0)
    mask[1000:1100, 30:1070] = 2  # a bar across many chunk columns
    mask[100:500, 850:880] = 2  # a U: two legs joined only by the bottom stroke
    mask[100:500, 950:980] = 2
    mask[470:500, 850:980] = 2
    mask[1200, 100] = mask[1201, 101] = 1  # corner contact: two regions under 4-connectivity
    mask[1250, 1000] = 1
    return mask


def _write(path: Path, mask: np.ndarray, mpp: float = 0.5, band_px: int = 256, probabilities: bool = False,
           metadata: dict | None = None):
    height, width = mask.shape
    writer = LabelPyramidWriter(path, width, height, mpp, NAMES, COLOURS, band_px=band_px,
                                n_probability_channels=len(NAMES) if probabilities else None, metadata=metadata)
    for y0 in range(0, height, 2 * band_px):
        band = mask[y0: y0 + 2 * band_px]
        probs = np.stack([(band == c).astype(np.uint8) * 255 for c in range(len(NAMES))]) if probabilities else None
        writer.write_band(y0, band, probs)
    return writer.finish()


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    mask = _synthetic_mask()
    path = tmp_path_factory.mktemp("masks") / "mask.ome.zarr"
    _write(path, mask, probabilities=True, metadata={"version": __version__, "slide_downsample": 2.0})
    return path, mask


# --- palette and downsampling --------------------------------------------------------------

def test_class_colors_distinct() -> None:
    for n in (1, 2, 9, 40, 256):
        colours = class_colors(n)
        assert len(colours) == n == len(set(colours)) and colours[0] == (0, 0, 0)
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours)
    with pytest.raises(ValueError, match="n_classes"):
        class_colors(257)


def test_mode_downsample_hand_made() -> None:
    labels = np.array([
        [1, 1, 0, 0, 2, 2, 1, 2, 4, 0, 7],
        [2, 0, 3, 3, 1, 1, 3, 0, 0, 4, 0],
        [0, 0, 5, 0, 6, 6, 0, 0, 9, 9, 8],
    ], np.uint8)
    # blocks: majority 1 | tie fg-bg -> fg 3 | tie 2-2 -> lower 1 | all distinct -> lowest fg 1
    #         | diagonal tie 4-0 -> 4 | odd column: (7, 0) tie -> 7
    # odd row: (0,0) -> 0 | (5,0) -> 5 | (6,6) -> 6 | (0,0) -> 0 | (9,9) -> 9 | (8) -> 8
    expected = np.array([[1, 3, 1, 1, 4, 7], [0, 5, 6, 0, 9, 8]], np.uint8)
    np.testing.assert_array_equal(mode_downsample_2x2(labels), expected)
    assert mode_downsample_2x2(np.zeros((1, 1), np.uint8)).shape == (1, 1)


def test_mean_downsample_hand_made() -> None:
    values = np.array([[[0, 255, 10], [255, 255, 20]], [[1, 2, 3], [4, 5, 6]]], np.uint8)
    np.testing.assert_array_equal(mean_downsample_2x2(values), [[[191, 15]], [[3, 5]]])


def test_pyramid_shapes() -> None:
    assert pyramid_shapes(300, 200) == [(300, 200)]
    assert pyramid_shapes(1300, 1100) == [(1300, 1100), (650, 550), (325, 275)]
    assert pyramid_shapes(2049, 10) == [(2049, 10), (1025, 5), (513, 3), (257, 2)]


# --- OME-Zarr label pyramid ----------------------------------------------------------------

def test_pyramid_read_by_ome_zarr(pyramid: tuple[Path, np.ndarray]) -> None:
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path, mask = pyramid
    location = parse_url(path, fmt=FormatV04())
    assert location is not None
    node = next(iter(Reader(location)()))
    assert node.load(Label) is not None and node.load(Multiscales) is not None
    assert [d.shape for d in node.data] == [(1300, 1100), (650, 550), (325, 275)]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    shifts = [t[1]["translation"] for t in node.metadata["coordinateTransformations"]]
    assert shifts == [[0.0, 0.0], [0.25, 0.25], [0.75, 0.75]]  # centre of level-k pixel 0
    assert [a["name"] for a in node.metadata["axes"]] == ["y", "x"]
    assert all(a["unit"] == "micrometer" and a["type"] == "space" for a in node.metadata["axes"])
    assert node.metadata["color"][0][3] == 0.0  # background transparent
    assert node.metadata["color"][1] == pytest.approx([c / 255 for c in COLOURS[1]] + [1.0])
    assert {i: p["class"] for i, p in node.metadata["properties"].items()} == dict(enumerate(NAMES))
    np.testing.assert_array_equal(np.asarray(node.data[0]), mask)
    np.testing.assert_array_equal(np.asarray(node.data[1]), mode_downsample_2x2(mask))
    np.testing.assert_array_equal(np.asarray(node.data[2]), mode_downsample_2x2(mode_downsample_2x2(mask)))

    root = zarr.open_group(path, mode="r")
    assert root.metadata.zarr_format == 2
    assert root.attrs["multiscales"][0]["version"] == "0.4" and root.attrs["image-label"]["version"] == "0.4"
    assert root.attrs["gsd_wsi"] == {"version": __version__, "slide_downsample": 2.0}
    level0 = open_label_level(path, 0)
    assert level0.dtype == np.uint8 and level0.chunks == (256, 256)
    assert json.loads((path / "0" / ".zarray").read_text())["dimension_separator"] == "/"


def test_probabilities_pyramid(pyramid: tuple[Path, np.ndarray]) -> None:
    path, mask = pyramid
    probs = zarr.open_group(path / "probabilities", mode="r")
    multiscale = probs.attrs["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["c", "y", "x"]
    assert multiscale["axes"][0]["type"] == "channel"
    assert [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]] == [
        [1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    assert probs.attrs["gsd_wsi"]["channel_classes"] == NAMES
    level0 = np.asarray(probs["0"])
    np.testing.assert_array_equal(level0[3], (mask == 3) * 255)
    np.testing.assert_array_equal(np.asarray(probs["1"]), mean_downsample_2x2(level0))
    assert probs["2"].shape == (4, 325, 275)


def test_pyramid_info_and_levels(pyramid: tuple[Path, np.ndarray]) -> None:
    path, _ = pyramid
    info = read_pyramid_info(path)
    assert info.class_names == tuple(NAMES) and info.colors == tuple(COLOURS) and info.mpp == 0.5
    assert info.level_mpp == (0.5, 1.0, 2.0) and info.n_probability_channels == 4
    assert label_levels(path) == [(1300, 1100), (650, 550), (325, 275)]
    with pytest.raises(ValueError, match="levels 0..2"):
        open_label_level(path, 3)


def test_tiny_mask_has_one_level(tmp_path: Path) -> None:
    info = _write(tmp_path / "m.ome.zarr", np.ones((5, 7), np.uint8), band_px=16)
    assert info.level_shapes == ((5, 7),)
    assert len(zarr.open_group(tmp_path / "m.ome.zarr", mode="r").attrs["multiscales"][0]["datasets"]) == 1


def test_writer_refuses_misuse(tmp_path: Path) -> None:
    path = tmp_path / "m.ome.zarr"
    writer = LabelPyramidWriter(path, 100, 300, 0.5, NAMES, COLOURS, band_px=64)
    band = np.zeros((64, 100), np.uint8)
    with pytest.raises(ValueError, match="row 0 is next"):
        writer.write_band(64, band)
    with pytest.raises(ValueError, match="multiple of 64"):
        writer.write_band(0, band[:50])
    with pytest.raises(ValueError, match="holds class 7"):
        writer.write_band(0, band + 7)
    with pytest.raises(ValueError, match="probabilities given"):
        writer.write_band(0, band, np.zeros((4, 64, 100), np.uint8))
    writer.write_band(0, band)
    with pytest.raises(MaskWriteError, match="rows 64..300 were never written"):
        writer.finish()
    with pytest.raises(MaskWriteError, match="unfinished"):
        read_pyramid_info(path)  # no multiscales before finish
    with pytest.raises(MaskWriteError, match="exists"):
        LabelPyramidWriter(path, 100, 300, 0.5, NAMES, COLOURS)
    with pytest.raises(ValueError, match="one per class"):
        LabelPyramidWriter(tmp_path / "p.ome.zarr", 10, 10, 0.5, NAMES, COLOURS, n_probability_channels=2)


def test_tall_mask_memory_bounded(tmp_path: Path) -> None:
    """A 640 x 24576 mask (15.7 MB) through the three writers, band by band: the peak of
    traced allocations stays at a few bands' worth, far below the size of level 0."""
    width, height, band_px = 640, 24576, 512
    level0_bytes = width * height
    cell_cols = (np.arange(width) // 101 % 4).astype(np.uint8)  # cells of 97 x 101 px, class (row + col) % 4
    path = tmp_path / "tall.ome.zarr"
    peaks = {}
    tracemalloc.start()
    try:
        writer = LabelPyramidWriter(path, width, height, 0.5, NAMES, COLOURS, band_px=band_px)
        for y0 in range(0, height, band_px):
            cell_rows = (np.arange(y0, y0 + band_px) // 97 % 4).astype(np.uint8)
            writer.write_band(y0, (cell_rows[:, None] + cell_cols[None, :]) % 4)
        info = writer.finish()
        peaks["zarr"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        write_pyramidal_tiff(path, tmp_path / "tall.tiff")
        peaks["tiff"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        summary = write_geojson(path, tmp_path / "tall.geojson", NAMES, COLOURS, 0.5, 1.0, chunk_px=512)
        peaks["geojson"] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.level_shapes[-1] == (384, 10) and len(info.level_shapes) == 7
    for name, peak in peaks.items():
        assert peak < level0_bytes / 3, f"{name}: {peak / 1e6:.1f} MB peak for a {level0_bytes / 1e6:.1f} MB mask"
    cells = (np.arange(-(-height // 97))[:, None] + np.arange(-(-width // 101))[None, :]) % 4
    assert sum(int(s["features"]) for s in summary.values()) == int((cells > 0).sum())  # corner contacts split
    level6 = np.asarray(open_label_level(path, 6))
    assert set(np.unique(level6).tolist()) == {0, 1, 2, 3}


# --- pyramidal TIFF ------------------------------------------------------------------------

def test_tiff_opens_in_openslide(pyramid: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    openslide = pytest.importorskip("openslide")
    path, mask = pyramid
    mpp = 0.50543  # not a round number: checks the rational resolution tags
    tiff_path = tmp_path / "mask.tiff"
    shapes = write_pyramidal_tiff(path, tiff_path, mpp=mpp, colors=COLOURS)
    assert shapes == [(1300, 1100), (650, 550), (325, 275)]

    with tifffile.TiffFile(tiff_path) as tif:
        pages = list(tif.pages)
        assert len(pages) == 3 and all(not p.subifds for p in pages)  # top-level IFDs only
        assert [int(p.subfiletype) for p in pages] == [0, 1, 1]
        assert all(p.is_tiled and p.tilewidth == 512 and p.compression == 8 and p.photometric == 3 for p in pages)
        assert pages[0].tags["Software"].value == f"gsd-wsi {__version__}"
        colormap = pages[0].colormap
        assert colormap.shape == (3, 256) and tuple(colormap[:, 3] // 257) == COLOURS[3]
        assert not colormap[:, len(COLOURS):].any()
        np.testing.assert_array_equal(pages[1].asarray(), mode_downsample_2x2(mask))

    slide = openslide.OpenSlide(str(tiff_path))
    try:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count == 3
        assert slide.level_dimensions == ((1100, 1300), (550, 650), (275, 325))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-6)
        points_l0_xy = {1: (200, 200), 3: (700, 500), 2: (500, 1050), 0: (700, 650)}  # class -> a pixel inside
        for level in range(3):  # downsamples 1, 2, 4: the same points hold at every level
            for value, (x, y) in points_l0_xy.items():
                rgba = np.asarray(slide.read_region((x, y), level, (1, 1)))[0, 0]
                assert tuple(rgba[:3]) == COLOURS[value] and rgba[3] == 255, (level, value, rgba)
        region = np.asarray(slide.read_region((0, 0), 0, (1100, 1300)))[..., :3]
        np.testing.assert_array_equal(region, np.asarray(COLOURS, np.uint8)[mask])  # whole level 0, exact
    finally:
        slide.close()


# --- GeoJSON -------------------------------------------------------------------------------

def _components(mask: np.ndarray) -> dict[int, list[int]]:
    """Sorted pixel counts of the 4-connected regions of each foreground class."""
    out = {}
    for value in range(1, len(NAMES)):
        labelled, n = ndi.label(mask == value, structure=FOUR_CONNECTED)
        out[value] = sorted(np.bincount(labelled.ravel())[1:].tolist()) if n else []
    return out


def _read_features(path: Path) -> list[dict]:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def test_geojson_regions_match_connected_components(pyramid: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, mask = pyramid
    mpp, downsample = 0.5, 2.0
    out = tmp_path / "mask.geojson"
    summary = write_geojson(path, out, NAMES, COLOURS, mpp, downsample, chunk_px=64)  # 21 x 18 chunks
    features = _read_features(out)
    expected = _components(mask)
    for value in range(1, len(NAMES)):
        mine = [f for f in features if f["properties"]["classification"]["name"] == NAMES[value]]
        areas_um2 = sorted(f["properties"]["measurements"]["Area um^2"] for f in mine)
        assert areas_um2 == [n * mpp**2 for n in expected[value]]  # one feature per region, areas exact
        assert summary[NAMES[value]]["features"] == len(expected[value])
        assert summary[NAMES[value]]["area_um2"] == pytest.approx((mask == value).sum() * mpp**2, rel=1e-12)
    for feature in features:
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["color"] == list(COLOURS[NAMES.index(props["classification"]["name"])])
        geometry = shape(feature["geometry"])
        assert geometry.geom_type in ("Polygon", "MultiPolygon") and geometry.is_valid
        # level-0 geometry: area scales with downsample^2
        assert geometry.area / downsample**2 * mpp**2 == pytest.approx(props["measurements"]["Area um^2"])
    ring = [shape(f["geometry"]) for f in features if f["properties"]["classification"]["name"] == "tumour"]
    assert len(ring) == 1 and len(ring[0].interiors) == 1  # the hole is an interior ring, not a feature
    bar = max((shape(f["geometry"]) for f in features if f["properties"]["classification"]["name"] == "stroma"),
              key=lambda g: g.area)
    assert bar.bounds == (30 * downsample, 1000 * downsample, 1070 * downsample, 1100 * downsample)
    assert len(bar.exterior.coords) == 5  # seams leave no extra vertices
    # the same regions whatever the chunking
    big = write_geojson(path, tmp_path / "big.geojson", NAMES, COLOURS, mpp, downsample, chunk_px=4096)
    assert big == summary


def test_geojson_offset_and_min_area(pyramid: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, mask = pyramid
    mpp, downsample, offset = 0.5, 4.0, (1000.0, 250.0)
    min_area = 2000.0  # um^2 = 8000 px: drops the small disc, the specks and the pixels
    out = tmp_path / "mask.geojson"
    summary = write_geojson(path, out, NAMES, COLOURS, mpp, downsample, offset_l0_xy=offset,
                            min_area_um2=min_area, chunk_px=100)
    features = _read_features(out)
    kept = {v: [n for n in sizes if n * mpp**2 >= min_area] for v, sizes in _components(mask).items()}
    assert len(features) == sum(len(k) for k in kept.values())
    assert summary["nucleus"]["features"] == 1 and summary["nucleus"]["dropped"] == 4
    nucleus = shape(next(f["geometry"] for f in features if f["properties"]["classification"]["name"] == "nucleus"))
    ys, xs = np.nonzero(ndi.label(mask == 1, structure=FOUR_CONNECTED)[0] == ndi.label(
        mask == 1, structure=FOUR_CONNECTED)[0][200, 200])
    assert nucleus.bounds == (xs.min() * 4 - 1000, ys.min() * 4 - 250, (xs.max() + 1) * 4 - 1000,
                              (ys.max() + 1) * 4 - 250)


def test_geojson_random_blobs_and_rounding(tmp_path: Path) -> None:
    """Random blobs over tiny chunks: every 4-connected region is one valid feature."""
    rng = np.random.default_rng(7)
    noise = ndi.gaussian_filter(rng.random((300, 260)), 3)
    mask = np.digitize(noise, np.quantile(noise, [0.4, 0.6, 0.8])).astype(np.uint8)
    path = tmp_path / "blobs.ome.zarr"
    _write(path, mask, mpp=0.2527, band_px=64)
    out = tmp_path / "blobs.geojson"
    write_geojson(path, out, NAMES, COLOURS, 0.2527, 1.0003, offset_l0_xy=(3, 7), chunk_px=32)
    features = _read_features(out)
    expected = _components(mask)
    assert len(features) == sum(len(v) for v in expected.values())
    for value in range(1, len(NAMES)):
        got = sorted(round(f["properties"]["measurements"]["Area um^2"] / 0.2527**2) for f in features
                     if f["properties"]["classification"]["name"] == NAMES[value])
        assert got == expected[value]
    assert all(shape(f["geometry"]).is_valid for f in features)
    coords = np.concatenate([np.asarray(shapely.get_coordinates(shape(f["geometry"]))) for f in features])
    np.testing.assert_array_equal(coords, np.round(coords, 2))


def test_geojson_empty_mask(tmp_path: Path) -> None:
    path = tmp_path / "empty.ome.zarr"
    _write(path, np.zeros((40, 30), np.uint8), band_px=16)
    summary = write_geojson(path, tmp_path / "empty.geojson", NAMES, COLOURS, 0.5, 1.0)
    assert _read_features(tmp_path / "empty.geojson") == []
    assert summary["nucleus"] == {"features": 0, "area_um2": 0.0, "dropped": 0}
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary left beside the output


# --- overlay -------------------------------------------------------------------------------

def test_overlay_colours_classes() -> None:
    thumb = np.full((260, 220, 3), 200, np.uint8)
    labels = np.zeros((130, 110), np.uint8)  # half the thumbnail size: resized nearest
    labels[60:100, 60:100] = 3
    picture = render_overlay(thumb, labels, NAMES, COLOURS, alpha=0.5)
    assert picture.shape == (260, 220, 3) and picture.dtype == np.uint8
    expected = np.rint(0.5 * 200 + 0.5 * np.asarray(COLOURS[3])).astype(np.uint8)
    np.testing.assert_array_equal(picture[160, 160], expected)  # inside the region: blended
    np.testing.assert_array_equal(picture[120, 150], COLOURS[3])  # its top border: opaque
    np.testing.assert_array_equal(picture[250, 210], [200, 200, 200])  # background untouched
    assert (picture[:40, :40] == 255).any()  # the legend box
    plain = render_overlay(thumb, labels, NAMES, COLOURS, alpha=0.5, outline=False)
    np.testing.assert_array_equal(plain[120, 150], expected)


def test_qupath_problems_finds_what_qupath_refuses(tmp_path: Path) -> None:
    from gsd_wsi.masks import DetectionWriter, qupath_problems

    good = tmp_path / "good.geojson"
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:4] = True
    mask[2, 2] = False  # a hole
    with DetectionWriter(good, "nucleus", (255, 0, 255), 0.5, 2.0) as detections:
        detections.add(mask, 10, 20, {"Hematoxylin OD mean": 0.5})
    assert qupath_problems(good) == []
    feature = json.loads(good.read_text())["features"][0]
    assert feature["properties"]["objectType"] == "detection"
    assert feature["properties"]["measurements"] == {"Area um^2": 11 * 0.25, "Hematoxylin OD mean": 0.5}

    def problems(**changes: object) -> list[str]:
        bad = json.loads(json.dumps(feature))
        for key, value in changes.items():
            target = bad if key == "geometry" else bad["properties"]
            target[key] = value
        path = tmp_path / "bad.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [bad]}))
        return qupath_problems(path)

    clockwise = {"type": "Polygon", "coordinates": [[[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]]}
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}
    assert "RFC 7946" in problems(geometry=clockwise)[0]
    assert "invalid geometry" in problems(geometry=bowtie)[0]
    assert "Point" in problems(geometry={"type": "Point", "coordinates": [0, 0]})[0]
    assert "objectType" in problems(objectType="cell")[0]
    assert "classification" in problems(classification={"name": "nucleus"})[0]
    assert "measurements" in problems(measurements={"Area um^2": "big"})[0]
    (tmp_path / "no.geojson").write_text("{")
    assert "not readable JSON" in qupath_problems(tmp_path / "no.geojson")[0]


def test_overlay_outlines_every_instance() -> None:
    """Two touching nuclei are one region of the class mask; with their ids the line between them is drawn."""
    from gsd_wsi.masks import render_overlay

    labels = np.zeros((40, 40), np.uint8)
    labels[10:30, 5:35] = 1
    ids = np.zeros((40, 40), np.uint32)
    ids[10:30, 5:20], ids[10:30, 20:35] = 1, 2
    thumb = np.full((40, 40, 3), 200, np.uint8)
    plain = render_overlay(thumb, labels, ["background", "nucleus"], [(0, 0, 0), (255, 0, 255)])
    split = render_overlay(thumb, labels, ["background", "nucleus"], [(0, 0, 0), (255, 0, 255)], instances=ids)
    assert (plain[15:25, 19:21] != [255, 0, 255]).any(axis=-1).all()  # no line inside the region
    assert (split[15:25, 19:21] == [255, 0, 255]).all()              # the line between the two
