"""Bringing images, labels and predictions to another resolution (finetune --train-mpp, evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gsd_wsi.datasets import LabelledImage, read_aperio_mpp, recorded_mpp, resample_example
from gsd_wsi.datasets.labelled import DatasetError
from gsd_wsi.imageops import predict_at_mpp, resize_labels, resize_probabilities, same_mpp, size_at_mpp


def _squares(size: int, side: int) -> np.ndarray:
    """An int32 instance map: a grid of ``side``-px squares, each touching its neighbours, ids 1..N."""
    ids = np.arange(1, (size // side) ** 2 + 1, dtype=np.int32).reshape(size // side, size // side)
    return np.kron(ids, np.ones((side, side), np.int32))


def test_1000_px_at_025_becomes_500_px_at_05() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    instances = _squares(1000, 20)
    semantic = (instances % 3).astype(np.int64)  # three classes
    out_image, out_semantic, out_instances = resample_example((image, semantic, instances), 0.25, 0.5)
    assert size_at_mpp(image.shape, 0.25, 0.5) == (500, 500)
    assert out_image.shape == (500, 500, 3) and out_image.dtype == np.uint8
    assert out_semantic.shape == out_instances.shape == (500, 500)
    assert out_semantic.dtype == np.int64 and out_instances.dtype == np.int32
    # antialiased: a 2x2 box average of the pixels it covers
    assert np.abs(out_image[10, 10].astype(int) - image[20:22, 20:22].mean(axis=(0, 1))).max() <= 1
    assert set(np.unique(out_semantic)) == {0, 1, 2}  # nearest: classes stay classes
    assert size_at_mpp((1000, 700), 0.2527, 0.5) == (354, 505)  # MoNuSeg 40x -> 20x, rounded


def test_instances_keep_their_ids_and_stay_apart() -> None:
    instances = _squares(200, 10)  # 400 touching squares of 10 px
    small = resize_labels(instances, (100, 100))
    assert np.array_equal(np.unique(small), np.unique(instances))  # none lost, none new, none merged
    assert np.array_equal(small, np.kron(instances[::10, ::10], np.ones((5, 5), np.int32)))  # each a 5-px square
    apart = np.zeros((40, 40), np.int32)
    apart[:, 10:18], apart[:, 22:30] = 1, 2  # a 4-px gap between them
    half = resize_labels(apart, (20, 20))
    assert (half[:, 9:11] == 0).all() and set(np.unique(half[:, 5:9])) == {1} and set(np.unique(half[:, 11:15])) == {2}


def test_same_resolution_within_2_percent_is_left_alone() -> None:
    example = (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int64), None)
    assert resample_example(example, 0.25, 0.2545) is example and same_mpp(0.5, 0.509)
    assert not same_mpp(0.5, 0.52)


def test_probabilities_resize_bilinear_and_still_sum_to_one() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 16, 24))
    probabilities = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    big = resize_probabilities(probabilities, (48, 32))
    assert big.shape == (3, 32, 48) and big.dtype == np.float32
    assert np.allclose(big.sum(0), 1.0, atol=1e-5)
    assert big.min() >= probabilities.min() - 1e-6 and big.max() <= probabilities.max() + 1e-6  # no overshoot


def test_predict_at_mpp() -> None:
    seen: list[tuple[int, ...]] = []

    def predict(rgb: np.ndarray) -> np.ndarray:
        seen.append(rgb.shape)
        dark = (rgb.sum(axis=2) < 300).astype(np.float32)
        return np.stack([1 - dark, dark])

    image = np.full((64, 48, 3), 230, np.uint8)
    image[16:48, 8:40] = 40
    direct = predict(image)
    assert np.array_equal(predict_at_mpp(predict, image, 0.25, None), direct)
    assert np.array_equal(predict_at_mpp(predict, image, 0.25, 0.252), direct)  # within 2 %: no resampling
    seen.clear()
    resampled = predict_at_mpp(predict, image, 0.25, 0.5)
    assert seen == [(32, 24, 3)] and resampled.shape == (2, 64, 48)
    assert np.array_equal(resampled.argmax(0), direct.argmax(0))  # a square on the 2-px lattice survives exactly


def test_aperio_xml_records_its_resolution(tmp_path: Path) -> None:
    with_mpp, without = tmp_path / "a.xml", tmp_path / "b.xml"
    with_mpp.write_text('<Annotations MicronsPerPixel="0.252700"><Annotation Id="1"/></Annotations>')
    without.write_text("<Annotations><Annotation Id='1'/></Annotations>")
    assert read_aperio_mpp(with_mpp) == pytest.approx(0.2527) and read_aperio_mpp(without) is None
    assert recorded_mpp(LabelledImage(tmp_path / "a.tif", None, with_mpp, None, "a")) == pytest.approx(0.2527)
    assert recorded_mpp(LabelledImage(tmp_path / "a.tif", tmp_path / "a.png", None, None, "a")) is None
    (tmp_path / "bad.xml").write_text("<Annotations")
    with pytest.raises(DatasetError, match="bad.xml"):
        read_aperio_mpp(tmp_path / "bad.xml")


def test_monuseg_xml_resolutions(monuseg_dir: Path) -> None:
    """The official files record 0.2456-0.2527 um/px (40x), or nothing."""
    values = [read_aperio_mpp(path) for path in sorted((monuseg_dir / "annotations").glob("*.xml"))]
    assert values and all(v is None or 0.24 < v < 0.26 for v in values)
    assert any(v == pytest.approx(0.2527) for v in values)
