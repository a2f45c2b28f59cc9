"""Labelled images on disk: discovery of three formats, loading, and splits by image.

Formats, detected by :func:`discover` in this order:

1. ``images/`` with ``masks/`` (semantic masks, same stems) and/or ``annotations/`` (Aperio
   XML polygons, same stems); an image needs at least one of the two.
2. MoNuSeg style: ``name.tif`` beside ``name.xml`` in one folder.
3. GlaS style: ``name.bmp`` beside ``name_anno.bmp`` (an instance label image) in one folder.

Every image without a label, and every label without an image, is returned in a list of
problems (and logged), never silently dropped. The split unit is the image stem.

Resolution: only Aperio XML records one (:func:`recorded_mpp`); :func:`resample_example`
brings an example to another resolution (image area-averaged, labels nearest).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from gsd_wsi.config import read_yaml_mapping
from gsd_wsi.datasets import DatasetError
from gsd_wsi.datasets.monuseg_xml import rasterise_instances, read_aperio_mpp, read_aperio_xml
from gsd_wsi.imageops import resize_labels, resize_rgb, same_mpp, size_at_mpp

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
GLAS_ANNO = "_anno"
SPLIT_KEYS = ("train", "val", "test")


@dataclass(frozen=True)
class LabelledImage:
    """One labelled image; at least one of the three label paths is set."""

    image_path: Path
    mask_path: Path | None  # semantic mask (class indices, or binary 0/255 read as 0/1)
    xml_path: Path | None  # Aperio XML polygons (instances)
    instance_path: Path | None  # instance label image (GlaS ``name_anno.bmp``)
    name: str  # the stem: the unit of every split


def _files(folder: Path, suffixes: Iterable[str]) -> dict[str, Path]:
    """Stem -> path of the files in ``folder`` with one of ``suffixes`` (first in sorted order)."""
    found: dict[str, Path] = {}
    wanted = {s.lower() for s in suffixes}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in wanted and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    return found


def _pair(images: dict[str, Path], labels: dict[str, dict[str, Path]], problems: list[str]) -> list[LabelledImage]:
    """Items for images with at least one label; problems for unmatched images and labels."""
    items: list[LabelledImage] = []
    for stem, image in sorted(images.items()):
        found = {kind: paths.get(stem) for kind, paths in labels.items()}
        if not any(found.values()):
            problems.append(f"image without a label: {image} (no {' or '.join(labels)} with stem {stem!r})")
            continue
        items.append(LabelledImage(image, found.get("mask"), found.get("xml"), found.get("instances"), stem))
    for kind, paths in labels.items():
        for stem in sorted(set(paths) - set(images)):
            problems.append(f"{kind} without an image: {paths[stem]}")
    return items


def discover(data_dir: Path) -> tuple[list[LabelledImage], list[str]]:
    """The usable labelled images under ``data_dir`` (sorted by name) and a list of problems."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: not a folder of labelled images")
    problems: list[str] = []
    if (data_dir / "images").is_dir():
        fmt = "images/ + masks/ or annotations/"
        labels: dict[str, dict[str, Path]] = {}
        if (data_dir / "masks").is_dir():
            labels["mask"] = _files(data_dir / "masks", IMAGE_SUFFIXES)
        if (data_dir / "annotations").is_dir():
            labels["xml"] = _files(data_dir / "annotations", (".xml",))
        if not labels:
            raise DatasetError(f"{data_dir}: has images/ but neither masks/ nor annotations/ beside it")
        items = _pair(_files(data_dir / "images", IMAGE_SUFFIXES), labels, problems)
    elif any(p.stem.endswith(GLAS_ANNO) for p in data_dir.glob("*.bmp")):
        fmt = "GlaS name.bmp + name_anno.bmp"
        bmps = _files(data_dir, (".bmp",))
        annos = {s[: -len(GLAS_ANNO)]: p for s, p in bmps.items() if s.endswith(GLAS_ANNO)}
        images = {s: p for s, p in bmps.items() if not s.endswith(GLAS_ANNO)}
        items = _pair(images, {"instances": annos}, problems)
    elif any(data_dir.glob("*.xml")):
        fmt = "MoNuSeg name.tif + name.xml"
        items = _pair(_files(data_dir, (".tif", ".tiff")), {"xml": _files(data_dir, (".xml",))}, problems)
    else:
        raise DatasetError(
            f"{data_dir}: no recognised labelled-image layout; expected images/ with masks/ or annotations/, "
            "name.tif beside name.xml, or name.bmp beside name_anno.bmp"
        )
    for problem in problems:
        log.warning("%s: %s", data_dir, problem)
    if not items:
        raise DatasetError(f"{data_dir} ({fmt}): no usable labelled image; problems: {'; '.join(problems[:5])}")
    log.info("%s: %d labelled images (%s), %d problem(s)", data_dir, len(items), fmt, len(problems))
    return items, problems


def _read_array(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot be read as an image ({exc})") from exc


def _read_rgb(path: Path) -> np.ndarray:
    array = _read_array(path)
    if array.dtype != np.uint8:
        raise DatasetError(f"{path}: pixel type {array.dtype}; expected 8-bit RGB")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, :3])
    raise DatasetError(f"{path}: image of shape {array.shape}; expected HxW or HxWx3 (RGB)")


def _read_labels(path: Path, what: str) -> np.ndarray:
    """A single-channel integer label image (a grey RGB image is accepted, a colour one is not)."""
    array = _read_array(path)
    if array.ndim == 3:
        if not (array == array[:, :, :1]).all():
            raise DatasetError(f"{path}: a colour {what}; expected one channel of integer labels")
        array = array[:, :, 0]
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise DatasetError(f"{path}: {what} of shape {array.shape} and type {array.dtype}; expected HxW integers")
    return array.astype(np.int64)


def _check_size(image: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if labels.shape != image.shape[:2]:
        raise DatasetError(
            f"size mismatch: {label_path} is {labels.shape[1]}x{labels.shape[0]} (WxH) but "
            f"{image_path} is {image.shape[1]}x{image.shape[0]}"
        )


def load_example(item: LabelledImage, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(image uint8 HxWx3, semantic int64 HxW, instances int32 HxW or None)`` of one item.

    The semantic map comes from the mask file (a binary 0/255 mask becomes 0/1), else from
    the instances (``> 0`` -> class 1). Instances come from the XML polygons or the GlaS
    instance image.
    """
    if n_classes < 2:
        raise DatasetError(f"n_classes={n_classes}; need at least 2 (background and one class)")
    image = _read_rgb(item.image_path)
    instances: np.ndarray | None = None
    if item.xml_path is not None:
        instances = rasterise_instances(read_aperio_xml(item.xml_path), image.shape[:2])
    elif item.instance_path is not None:
        labels = _read_labels(item.instance_path, "instance label image")
        _check_size(image, labels, item.image_path, item.instance_path)
        if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
            raise DatasetError(f"{item.instance_path}: instance ids outside 0..2^31-1")
        instances = labels.astype(np.int32)
    if item.mask_path is not None:
        semantic = _read_labels(item.mask_path, "mask")
        _check_size(image, semantic, item.image_path, item.mask_path)
        values = np.unique(semantic)
        if 255 in values and set(values.tolist()) <= {0, 255}:
            semantic = (semantic > 0).astype(np.int64)  # binary 0/255 mask
        low, high = int(semantic.min()), int(semantic.max())
        if low < 0 or high >= n_classes:
            bad = low if low < 0 else high
            raise DatasetError(
                f"{item.mask_path}: class index {bad} outside 0..{n_classes - 1} (n_classes={n_classes}); "
                "raise n_classes or fix the mask"
            )
    elif instances is not None:
        semantic = (instances > 0).astype(np.int64)
    else:
        raise DatasetError(f"{item.name}: no mask, XML or instance image to label {item.image_path}")
    return image, semantic, instances


#: Where :func:`load_instance_example` took an item's instances from, best first.
INSTANCE_SOURCES = ("xml", "instance image", "mask instance ids", "mask connected components")


def load_instance_example(item: LabelledImage) -> tuple[np.ndarray, np.ndarray, str]:
    """``(image uint8 HxWx3, instances int32 HxW, source)`` of one item, for instance-aware targets.

    The instances come from the best label the item has (``source``, one of
    :data:`INSTANCE_SOURCES`): its Aperio XML polygons, its instance image (GlaS), the ids of
    its mask when the mask holds more than one non-zero value, else the connected components
    of its binary mask, in which touching objects stay merged (MoNuSeg's third-party PNG masks
    are binary: on the 13 images with official XML, 4230 components for 4949 polygons, 548
    components holding two or more nuclei).
    """
    image = _read_rgb(item.image_path)
    if item.xml_path is not None:
        return image, rasterise_instances(read_aperio_xml(item.xml_path), image.shape[:2]), "xml"
    path, what = (item.instance_path, "instance label image") if item.instance_path is not None else (item.mask_path, "mask")
    if path is None:
        raise DatasetError(f"{item.name}: no mask, XML or instance image to label {item.image_path}")
    labels = _read_labels(path, what)
    _check_size(image, labels, item.image_path, path)
    if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
        raise DatasetError(f"{path}: {what} with ids outside 0..2^31-1")
    if item.instance_path is not None:
        return image, labels.astype(np.int32), "instance image"
    if len(np.unique(labels[labels > 0])) > 1:
        return image, labels.astype(np.int32), "mask instance ids"
    components, count = ndi.label(labels > 0)
    log.debug("%s: binary mask, %d connected components taken as instances", path, count)
    return image, components.astype(np.int32), "mask connected components"


Example = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # image, semantic, instances (as load_example)


def recorded_mpp(item: LabelledImage) -> float | None:
    """The resolution (um/px) the item's files record: its Aperio XML's ``MicronsPerPixel``, else None."""
    return read_aperio_mpp(item.xml_path) if item.xml_path is not None else None


def resample_example(example: Example, from_mpp: float, to_mpp: float) -> Example:
    """``(image, semantic, instances)`` at ``from_mpp`` brought to ``to_mpp`` um/px (unchanged within 2 %).

    The image is area-averaged when shrinking (bicubic when growing); the semantic and
    instance maps are resampled nearest, so classes stay classes and every instance keeps its id.
    """
    if same_mpp(from_mpp, to_mpp):
        return example
    image, semantic, instances = example
    size = size_at_mpp(image.shape, from_mpp, to_mpp)
    return (resize_rgb(image, size), resize_labels(semantic, size),
            None if instances is None else resize_labels(instances, size))


def _check_fraction(name: str, value: float, low_open: bool, high_open: bool) -> None:
    ok = math.isfinite(value) and (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise DatasetError(f"{name}={value!r}; expected a fraction in {interval}")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _shuffled(items: Sequence[LabelledImage], seed: int) -> list[LabelledImage]:
    """``items`` sorted by name, then permuted by ``seed``: independent of the input order."""
    ordered = sorted(items, key=lambda item: item.name)
    names = [item.name for item in ordered]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"image names must be unique to split by image; repeated: {', '.join(duplicates)}")
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in order]


def split_by_image(
    items: Sequence[LabelledImage], val_fraction: float, test_names: Sequence[str] = (), seed: int = 0
) -> dict[str, list[LabelledImage]]:
    """``{"train", "val", "test"}`` by whole image; ``test_names`` go to test, the rest is shuffled.

    ``round(val_fraction * n_rest)`` images (at least 1 when ``val_fraction > 0``) go to
    validation; at least one image stays in train. Deterministic in ``seed``.
    """
    _check_fraction("val_fraction", val_fraction, low_open=False, high_open=True)
    by_name = {item.name: item for item in items}
    unknown = sorted(set(test_names) - set(by_name))
    if unknown:
        raise DatasetError(f"test image(s) not among the {len(by_name)} discovered: {', '.join(unknown)}")
    test_set = set(test_names)
    rest = _shuffled([item for item in items if item.name not in test_set], seed)
    n_val = _round_half_up(val_fraction * len(rest))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if len(rest) - n_val < 1:
        raise DatasetError(
            f"{len(rest)} image(s) outside the test set cannot give val_fraction={val_fraction} and a train set; "
            "use more images or a smaller val_fraction"
        )
    return {
        "train": sorted(rest[n_val:], key=lambda item: item.name),
        "val": sorted(rest[:n_val], key=lambda item: item.name),
        "test": sorted((by_name[n] for n in test_set), key=lambda item: item.name),
    }


def split_from_file(
    items: Sequence[LabelledImage], listed: dict[str, list[str]], val_fraction: float, seed: int = 0
) -> dict[str, list[LabelledImage]]:
    """``{"train", "val", "test"}`` as a split file lists them (see :func:`read_split_file`).

    ``test`` images are never trained on. With a ``train`` list, only those images train (the
    images in no list are left out); with a ``val`` list, those images validate and nothing is
    drawn, else ``val_fraction`` of the training images are drawn by ``seed`` as in
    :func:`split_by_image`.
    """
    test, train, val = (listed.get(key) or [] for key in ("test", "train", "val"))
    if train:
        kept = set(train) | set(val) | set(test)
        items = [item for item in items if item.name in kept]
    if not val:
        return split_by_image(items, val_fraction, test, seed)
    by_name = {item.name: item for item in items}
    unknown = sorted((set(val) | set(test)) - set(by_name))
    if unknown:
        raise DatasetError(f"split image(s) not among the {len(by_name)} discovered: {', '.join(unknown)}")
    taken = set(val) | set(test)
    rest = [item for item in items if item.name not in taken]
    if not rest:
        raise DatasetError("the split file leaves no image to train on; list some under 'train'")
    return {
        "train": sorted(rest, key=lambda item: item.name),
        "val": sorted((by_name[n] for n in val), key=lambda item: item.name),
        "test": sorted((by_name[n] for n in test), key=lambda item: item.name),
    }


def read_split_file(path: Path, known_names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Image stems per split from a JSON or YAML mapping ``{"train": [...], "test": [...]}``.

    Keys other than ``train``/``val``/``test`` are refused, except ``note``. A stem listed
    twice is an error; with ``known_names`` given, stems not among them are an error listing them.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise DatasetError(f"{path}: no such split file") from exc
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    else:
        data = read_yaml_mapping(path, f"split file {path}")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping of split name -> list of image stems")
    extra = sorted(set(data) - set(SPLIT_KEYS) - {"note"})
    if extra:
        raise DatasetError(f"{path}: unknown key(s) {', '.join(extra)}; known: {', '.join(SPLIT_KEYS)}, note")
    splits: dict[str, list[str]] = {}
    for key in SPLIT_KEYS:
        names = data.get(key) or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{path}: {key!r} must be a list of image stems (strings)")
        splits[key] = list(names)
    everything = [n for key in SPLIT_KEYS for n in splits[key]]
    repeated = sorted({n for n in everything if everything.count(n) > 1})
    if repeated:
        raise DatasetError(f"{path}: image(s) listed more than once: {', '.join(repeated)}")
    if known_names is not None:
        unknown = sorted(set(everything) - set(known_names))
        if unknown:
            raise DatasetError(f"{path}: image stem(s) not in the data: {', '.join(unknown)}")
    return splits


def label_subset(items: Sequence[LabelledImage], fraction: float, seed: int) -> list[LabelledImage]:
    """``round(fraction * n)`` images (at least 1) for the low-label regime, sorted by name.

    For one seed, the subsets of increasing fractions are nested.
    """
    _check_fraction("fraction", fraction, low_open=True, high_open=False)
    if not items:
        raise DatasetError("label_subset: zero labelled images to draw from")
    chosen = _shuffled(items, seed)[: max(1, _round_half_up(fraction * len(items)))]
    return sorted(chosen, key=lambda item: item.name)
