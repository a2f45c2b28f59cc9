"""Labelled-image data sets: the three formats, loading, Aperio XML, splits by image."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from gsd_wsi.datasets import (
    DatasetError,
    LabelledImage,
    discover,
    label_subset,
    load_example,
    rasterise_instances,
    read_aperio_xml,
    read_split_file,
    split_by_image,
    split_from_file,
)
from gsd_wsi.errors import GsdWsiError

SPLIT_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "monuseg_split.json"
H, W = 24, 32


def _rgb(seed: int = 0, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _xml(regions: list[list[tuple[str, str]]]) -> str:
    body = "".join(
        f'<Region Id="{i + 1}"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in vertices)
        + "</Vertices></Region>"
        for i, vertices in enumerate(regions)
    )
    regions_xml = f"<Regions>{body}</Regions>"
    return f'<Annotations MicronsPerPixel="0.25"><Annotation Id="1">{regions_xml}</Annotation></Annotations>'


SQUARE = [("2", "2"), ("10", "2"), ("10", "8"), ("2", "8")]  # x 2..10, y 2..8
OVERLAP = [("8", "4"), ("20", "4"), ("20", "12"), ("8", "12")]  # overlaps SQUARE at x 8..10, y 4..8


def _folder_format(root: Path) -> Path:
    """images/ + masks/ + annotations/: a.png (0/255 mask), b.tif (class mask + XML), c (no label), d mask only."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "annotations").mkdir()
    Image.fromarray(_rgb(1)).save(root / "images" / "a.png")
    tifffile.imwrite(root / "images" / "b.tif", _rgb(2))
    Image.fromarray(_rgb(3)).save(root / "images" / "c.png")
    binary = np.zeros((H, W), np.uint8)
    binary[5:10, 5:15] = 255
    Image.fromarray(binary).save(root / "masks" / "a.png")
    classes = np.zeros((H, W), np.uint8)
    classes[:, 10:20], classes[:, 20:] = 1, 2
    Image.fromarray(classes).save(root / "masks" / "b.png")
    Image.fromarray(binary).save(root / "masks" / "d.png")
    (root / "annotations" / "b.xml").write_text(_xml([SQUARE, OVERLAP]))
    return root


def test_folder_format_discovery_and_problems(tmp_path: Path) -> None:
    items, problems = discover(_folder_format(tmp_path))
    assert [i.name for i in items] == ["a", "b"]
    assert items[0].mask_path is not None and items[0].xml_path is None
    assert items[1].xml_path == tmp_path / "annotations" / "b.xml"
    assert any("image without a label" in p and "c.png" in p for p in problems)
    assert any("mask without an image" in p and "d.png" in p for p in problems)
    assert len(problems) == 2


def test_folder_format_loading(tmp_path: Path) -> None:
    items, _ = discover(_folder_format(tmp_path))
    image, semantic, instances = load_example(items[0], n_classes=2)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert semantic.dtype == np.int64 and set(np.unique(semantic)) == {0, 1}  # 0/255 -> 0/1
    assert semantic.sum() == 5 * 10 and instances is None
    image, semantic, instances = load_example(items[1], n_classes=3)
    np.testing.assert_array_equal(image, _rgb(2))
    assert set(np.unique(semantic)) == {0, 1, 2}  # semantic from the mask, not the XML
    assert instances is not None and instances.dtype == np.int32 and instances.shape == (H, W)
    assert set(np.unique(instances)) == {0, 1, 2}
    with pytest.raises(DatasetError, match=r"b\.png: class index 2 outside 0..1"):
        load_example(items[1], n_classes=2)


def test_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    Image.fromarray(_rgb(0)).save(tmp_path / "x.png")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(tmp_path / "x_mask.png")
    item = LabelledImage(tmp_path / "x.png", tmp_path / "x_mask.png", None, None, "x")
    with pytest.raises(DatasetError, match=rf"{W}x{H + 1}.*{W}x{H}"):
        load_example(item, n_classes=2)


def test_monuseg_format(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "s1.tif", _rgb(4))
    (tmp_path / "s1.xml").write_text(_xml([SQUARE]))
    tifffile.imwrite(tmp_path / "s2.tif", _rgb(5))  # no XML
    (tmp_path / "s3.xml").write_text(_xml([SQUARE]))  # no image
    items, problems = discover(tmp_path)
    assert [i.name for i in items] == ["s1"] and items[0].mask_path is None
    assert len(problems) == 2 and "s2.tif" in problems[0] and "s3.xml" in problems[1]
    image, semantic, instances = load_example(items[0], n_classes=2)
    assert image.shape == (H, W, 3)
    np.testing.assert_array_equal(semantic, (instances > 0).astype(np.int64))
    # pixel centres inside x 2..10, y 2..8 (boundary included by skimage): rows 2..8, cols 2..10
    assert np.argwhere(instances == 1).min(0).tolist() == [2, 2]
    assert np.argwhere(instances == 1).max(0).tolist() == [8, 10]


def test_glas_format(tmp_path: Path) -> None:
    anno = np.zeros((H, W), np.uint8)
    anno[2:8, 2:8], anno[10:20, 10:30] = 1, 2
    for stem in ("train_1", "train_2"):
        Image.fromarray(_rgb(6)).save(tmp_path / f"{stem}.bmp")
    Image.fromarray(anno).save(tmp_path / "train_1_anno.bmp")
    Image.fromarray(anno).save(tmp_path / "train_9_anno.bmp")
    (tmp_path / "Grade.csv").write_text("name,grade\n")
    items, problems = discover(tmp_path)
    assert [i.name for i in items] == ["train_1"] and items[0].instance_path is not None
    assert len(problems) == 2 and "train_2.bmp" in problems[0] and "train_9_anno.bmp" in problems[1]
    image, semantic, instances = load_example(items[0], n_classes=2)
    assert image.shape == (H, W, 3) and instances.dtype == np.int32
    np.testing.assert_array_equal(instances, anno)
    assert semantic.sum() == (anno > 0).sum()


def test_discover_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        discover(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no recognised"):
        discover(tmp_path)
    tifffile.imwrite(tmp_path / "lonely.tif", _rgb(0))
    (tmp_path / "other.xml").write_text(_xml([SQUARE]))
    with pytest.raises(DatasetError, match="no usable labelled image"):
        discover(tmp_path)


def test_xml_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<Annotations><Region>")
    with pytest.raises(DatasetError, match="bad.xml.*not well-formed"):
        read_aperio_xml(bad)
    empty = tmp_path / "empty.xml"
    empty.write_text("<Annotations><Annotation/></Annotations>")
    with pytest.raises(DatasetError, match="no <Region>"):
        read_aperio_xml(empty)
    nan = tmp_path / "nan.xml"
    nan.write_text(_xml([SQUARE, [("1", "1"), ("abc", "2"), ("3", "3")]]))
    with pytest.raises(DatasetError, match=r"nan.xml: region 1 .*X='abc'"):
        read_aperio_xml(nan)
    short = tmp_path / "short.xml"
    short.write_text(_xml([SQUARE, [("1", "1"), ("5", "5")], OVERLAP]))
    with pytest.raises(DatasetError, match=r"short.xml: region 1 .*2 vertices"):
        read_aperio_xml(short, strict=True)
    with caplog.at_level(logging.WARNING):
        polygons = read_aperio_xml(short)  # default: degenerate regions skipped, with a warning
    assert len(polygons) == 2 and "skipped 1 region" in caplog.text
    only_short = tmp_path / "only_short.xml"
    only_short.write_text(_xml([[("1", "1")]]))
    with pytest.raises(DatasetError, match="none of the 1 regions"):
        read_aperio_xml(only_short)
    assert issubclass(DatasetError, GsdWsiError) and issubclass(DatasetError, ValueError)


def test_rasterise_later_polygons_win() -> None:
    polygons = _polygons([SQUARE, OVERLAP])
    instances = rasterise_instances(polygons, (H, W))
    assert instances[5, 9] == 2 and instances[5, 3] == 1 and instances[0, 0] == 0
    assert rasterise_instances(polygons[::-1], (H, W))[5, 9] == 2  # SQUARE is now id 2 and last


def _polygons(regions: list[list[tuple[str, str]]]) -> list[np.ndarray]:
    return [np.array([(float(x), float(y)) for x, y in r]) for r in regions]


def _items(n: int) -> list[LabelledImage]:
    return [LabelledImage(Path(f"i{k:02d}.png"), Path(f"m{k:02d}.png"), None, None, f"i{k:02d}") for k in range(n)]


def test_split_by_image_disjoint_and_deterministic() -> None:
    items = _items(30)
    split = split_by_image(items, 0.2, test_names=["i03", "i07"], seed=1)
    names = {k: [i.name for i in v] for k, v in split.items()}
    assert names["test"] == ["i03", "i07"] and len(names["val"]) == round(0.2 * 28) and len(names["train"]) == 22
    assert sum(len(v) for v in names.values()) == 30 and len(set().union(*names.values())) == 30
    assert split == split_by_image(items[::-1], 0.2, test_names=["i07", "i03"], seed=1)  # order-independent
    assert split != split_by_image(items, 0.2, test_names=["i03", "i07"], seed=2)
    assert split_by_image(items, 0.0)["val"] == []
    with pytest.raises(DatasetError, match="nope"):
        split_by_image(items, 0.2, test_names=["nope"])
    with pytest.raises(DatasetError, match="val_fraction=1.0"):
        split_by_image(items, 1.0)


def test_split_from_file_keeps_its_lists() -> None:
    items = _items(10)
    names = lambda split: {k: [i.name for i in v] for k, v in split.items()}  # noqa: E731
    # Only a test list: as split_by_image; a train list naming every other image changes nothing.
    everything_else = [f"i{k:02d}" for k in range(2, 10)]
    assert split_from_file(items, {"test": ["i00", "i01"]}, 0.25, 3) == split_by_image(items, 0.25, ["i00", "i01"], 3)
    assert (split_from_file(items, {"test": ["i00", "i01"], "train": everything_else}, 0.25, 3)
            == split_by_image(items, 0.25, ["i00", "i01"], 3))
    # A shorter train list: the images in no list are left out; val is drawn from the list.
    short = names(split_from_file(items, {"test": ["i00"], "train": ["i02", "i03", "i04", "i05"]}, 0.25, 0))
    assert short["test"] == ["i00"] and len(short["val"]) == 1
    assert sorted(short["train"] + short["val"]) == ["i02", "i03", "i04", "i05"]
    # A val list is the validation set, whatever the seed; train is the train list, else the rest.
    fixed = {"test": ["i00"], "train": ["i02", "i03"], "val": ["i09", "i05"]}
    assert names(split_from_file(items, fixed, 0.25, 0)) == {"train": ["i02", "i03"], "val": ["i05", "i09"],
                                                              "test": ["i00"]}
    assert split_from_file(items, fixed, 0.25, 0) == split_from_file(items, fixed, 0.5, 7)
    rest = names(split_from_file(items, {"val": ["i01"]}, 0.25, 0))
    assert rest["val"] == ["i01"] and rest["test"] == [] and len(rest["train"]) == 9
    with pytest.raises(DatasetError, match="no image to train on"):
        split_from_file(_items(2), {"val": ["i00"], "test": ["i01"]}, 0.25, 0)


def test_label_subset() -> None:
    items = _items(24)
    subset = label_subset(items, 0.1, seed=0)
    assert len(subset) == 2 and label_subset(items, 0.1, seed=0) == subset
    assert len(label_subset(items, 0.01, seed=0)) == 1 and len(label_subset(items, 1.0, seed=0)) == 24
    assert set(subset) <= set(label_subset(items, 0.5, seed=0))  # nested for one seed
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DatasetError, match="fraction"):
            label_subset(items, bad, seed=0)
    with pytest.raises(DatasetError, match="zero labelled images"):
        label_subset([], 0.5, seed=0)


def test_read_split_file_errors(tmp_path: Path) -> None:
    yaml_file = tmp_path / "split.yaml"
    yaml_file.write_text("train: [a, b]\ntest: [c]\n")
    assert read_split_file(yaml_file) == {"train": ["a", "b"], "val": [], "test": ["c"]}
    with pytest.raises(DatasetError, match="not in the data: c"):
        read_split_file(yaml_file, known_names=["a", "b"])
    yaml_file.write_text("train: [a]\ntest: [a]\n")
    with pytest.raises(DatasetError, match="more than once: a"):
        read_split_file(yaml_file)
    yaml_file.write_text("trian: [a]\n")
    with pytest.raises(DatasetError, match="unknown key"):
        read_split_file(yaml_file)


# ---- real MoNuSeg -----------------------------------------------------------------------


def test_monuseg_discovery_and_split_file(monuseg_dir: Path) -> None:
    items, problems = discover(monuseg_dir)
    assert len(items) == 30 and problems == []
    assert sum(i.xml_path is not None for i in items) == 13
    split = read_split_file(SPLIT_FILE, known_names=[i.name for i in items])
    assert len(split["train"]) == 24 and len(split["test"]) == 6 and split["val"] == []
    assert sum(i.name in split["test"] and i.xml_path is not None for i in items) >= 3
    assert len({name.split("-")[1] for name in split["test"]}) == 6  # six TCGA sites
    parts = split_by_image(items, 0.2, test_names=split["test"], seed=0)
    assert {i.name for i in parts["train"] + parts["val"]} == set(split["train"])


def test_monuseg_xml_agrees_with_masks(monuseg_dir: Path) -> None:
    items, _ = discover(monuseg_dir)
    dices = {}
    for item in (i for i in items if i.xml_path is not None):
        image, semantic, instances = load_example(item, n_classes=2)
        assert image.shape == (1000, 1000, 3) and instances is not None
        n = len(np.unique(instances)) - 1
        assert 200 <= n <= 800, (item.name, n)
        fg = instances > 0
        dices[item.name] = 2 * (fg & (semantic == 1)).sum() / (fg.sum() + semantic.sum())
    assert len(dices) == 13
    assert min(dices.values()) >= 0.9, dices
