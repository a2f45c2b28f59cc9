"""gsd_wsi/instances.py: touching nuclei split by the contour watershed, area rules in um^2, tuning."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from gsd_wsi.errors import ConfigError
from gsd_wsi.instances import PostprocessConfig, instances_from_probabilities, recorded_postprocess, tune_postprocess
from gsd_wsi.metrics import aji, label_instances, panoptic_quality
from gsd_wsi.targets import contour_target, distance_target

MPP = 0.25


def _touching_discs(shape: tuple[int, int] = (60, 80), radius: int = 10) -> np.ndarray:
    """Two discs of ``radius`` px whose centres are 1.7 radii apart: they touch along a chord."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    instances = np.zeros(shape, np.int32)
    instances[(yy - 30) ** 2 + (xx - 30) ** 2 <= radius**2] = 1
    right = ((yy - 30) ** 2 + (xx - 30 - int(1.7 * radius)) ** 2 <= radius**2) & (instances == 0)
    instances[right] = 2
    return instances


def _contour_probabilities(instances: np.ndarray, boundary_px: float = 2, sure: float = 1.0) -> np.ndarray:
    """(3, H, W) softmax-like map from the contour target: ``sure`` on the target's class, the rest spread."""
    target = contour_target(instances, boundary_px)
    onehot = np.stack([(target == c) for c in range(3)]).astype(np.float64)
    return onehot * sure + (1.0 - onehot) * (1.0 - sure) / 2


def test_touching_discs_split_by_the_contour_watershed_but_merged_by_components() -> None:
    instances = _touching_discs()
    probabilities = _contour_probabilities(instances)
    assert label_instances(1 - probabilities[0] > 0.5).max() == 1  # connected components merge them
    labels = instances_from_probabilities(probabilities, PostprocessConfig(kind="contour"), MPP)
    assert labels.dtype == np.int32 and labels.shape == instances.shape
    assert labels.max() == 2 and labels[30, 30] != labels[30, 47] and labels[30, 30] > 0 and labels[30, 47] > 0
    assert np.array_equal(labels > 0, instances > 0)  # grown into all of the foreground (interior + boundary)
    assert aji(labels, instances) > 0.95


def test_distance_seeds_split_touching_discs() -> None:
    instances = _touching_discs()
    foreground = (instances > 0).astype(np.float64)
    probabilities = np.stack([1 - foreground, foreground, distance_target(instances)])
    labels = instances_from_probabilities(probabilities, PostprocessConfig(kind="distance"), MPP)
    assert labels.max() == 2 and aji(labels, instances) > 0.95
    semantic = instances_from_probabilities(probabilities[:2], PostprocessConfig(kind="semantic"), MPP)
    assert semantic.max() == 1


def test_area_rules_are_in_square_micrometres() -> None:
    """A 16-px square (1 um^2 at 0.25 um/px, 4 um^2 at 0.5) against min_area_um2 = 2; a 4-px hole likewise."""
    probabilities = np.zeros((2, 40, 40))
    probabilities[0] = 1.0
    probabilities[:, 5:9, 5:9] = [[[0.0]], [[1.0]]]  # a 4 x 4 px speck
    probabilities[:, 20:34, 20:34] = [[[0.0]], [[1.0]]]  # a 14 x 14 px object with a 2 x 2 px hole
    probabilities[:, 26:28, 26:28] = [[[1.0]], [[0.0]]]
    config = PostprocessConfig(kind="semantic", min_area_um2=2.0, max_hole_um2=0.5)
    fine = instances_from_probabilities(probabilities, config, mpp=0.25)  # speck 1 um^2 < 2; hole 0.25 um^2 < 0.5
    assert fine.max() == 1 and fine[6, 6] == 0 and fine[26, 26] == 1
    coarse = instances_from_probabilities(probabilities, config, mpp=0.5)  # speck 4 um^2 >= 2; hole 1 um^2 >= 0.5
    assert coarse.max() == 2 and coarse[6, 6] > 0 and coarse[26, 26] == 0


def test_a_seedless_object_is_kept_and_small_seeds_are_dropped() -> None:
    instances = _touching_discs()
    probabilities = _contour_probabilities(instances)
    probabilities[:, 2:8, 2:8] = [[[0.0]], [[0.0]], [[1.0]]]  # all boundary, no interior: no seed
    labels = instances_from_probabilities(probabilities, PostprocessConfig(kind="contour", min_area_um2=0), MPP)
    assert labels.max() == 3 and labels[4, 4] > 0
    many = PostprocessConfig(kind="contour", min_seed_um2=1000.0, min_area_um2=0)  # every seed too small
    assert instances_from_probabilities(probabilities, many, MPP).max() == 2  # the merged discs and the square


def test_config_round_trip_defaults_and_refusals() -> None:
    config = PostprocessConfig(kind="contour", seed_threshold=0.3, min_area_um2=8.0)
    assert PostprocessConfig.from_dict(config.to_dict()) == config
    assert PostprocessConfig.from_dict({"kind": "contour"}) == PostprocessConfig(kind="contour")
    assert PostprocessConfig.from_dict(None) == PostprocessConfig()
    with pytest.raises(ConfigError, match="unknown key"):
        PostprocessConfig.from_dict({"method": "watershed"})
    with pytest.raises(ConfigError, match="seed_threshold=1.5"):
        PostprocessConfig(seed_threshold=1.5)
    with pytest.raises(ConfigError, match="kind='blobs'"):
        PostprocessConfig(kind="blobs")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\(3, H, W\)"):
        instances_from_probabilities(np.zeros((2, 8, 8)), PostprocessConfig(kind="contour"), MPP)
    with pytest.raises(ConfigError, match="needs the images' resolution"):
        tune_postprocess([], "contour", None)


def test_recorded_postprocess_reads_what_model_json_says() -> None:
    """What evaluate and segment both do with a model.json: target kind, then its post-processing."""
    assert recorded_postprocess({}) == ("semantic", None)  # an old model: components, untuned
    tuned = {"kind": "semantic", "foreground_threshold": 0.7, "min_area_um2": 16.0}
    assert recorded_postprocess({"postprocess": tuned}) == ("semantic", PostprocessConfig.from_dict(tuned))
    # an instance model without a record gets its kind's defaults; a record without a kind takes the target's
    assert recorded_postprocess({"target": {"kind": "distance"}}) == ("distance", PostprocessConfig(kind="distance"))
    record = {"target": {"kind": "contour"}, "postprocess": {"seed_threshold": 0.3}}
    assert recorded_postprocess(record) == ("contour", PostprocessConfig(kind="contour", seed_threshold=0.3))
    with pytest.raises(ConfigError, match="target kind 'contour' but postprocess kind 'distance'"):
        recorded_postprocess({"target": {"kind": "contour"}, "postprocess": {"kind": "distance"}})


def test_tune_postprocess_finds_thresholds_that_split_a_hesitant_map() -> None:
    """Interior and boundary at 0.45 each: the default seed threshold 0.5 finds no seed (one merged
    object), the grid's 0.3 splits the discs."""
    instances = _touching_discs()
    target = contour_target(instances, 2)
    probabilities = np.stack([np.where(target == 0, 0.9, 0.1), np.where(target == 1, 0.45, 0.05),
                              np.where(target == 2, 0.45, 0.05)])
    default = instances_from_probabilities(probabilities, PostprocessConfig(kind="contour"), MPP)
    assert default.max() == 1 and aji(default, instances) < 0.6
    tuned, scores = tune_postprocess([(probabilities, instances)], "contour", MPP)
    assert tuned.kind == "contour" and tuned.seed_threshold < 0.45
    found = instances_from_probabilities(probabilities, tuned, MPP)
    assert aji(found, instances) == pytest.approx(scores["aji"]) and scores["aji"] > 0.95
    assert panoptic_quality(found, instances)["pq"] == pytest.approx(scores["pq"])
    empty = tune_postprocess([(np.stack([np.ones((8, 8)), np.zeros((8, 8)), np.zeros((8, 8))]),
                               np.zeros((8, 8), np.int32))], "contour", MPP)
    assert empty[0] == PostprocessConfig(kind="contour") and math.isnan(empty[1]["aji"])


def test_tune_postprocess_on_a_noisy_1000_px_image() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:1000, :1000]
    instances = np.zeros((1000, 1000), np.int32)
    for k, (cy, cx) in enumerate(np.stack(np.meshgrid(range(20, 980, 40), range(20, 980, 40))).reshape(2, -1).T):
        disc = ((yy - cy - rng.uniform(-5, 5)) ** 2 + (xx - cx - rng.uniform(-5, 5)) ** 2 < rng.uniform(10, 17) ** 2)
        instances[disc & (instances == 0)] = k + 1
    onehot = np.stack([(contour_target(instances, 4) == c) for c in range(3)]).astype(np.float32)
    probabilities = ndi.gaussian_filter(onehot, (0, 2, 2)) + rng.uniform(0, 0.3, onehot.shape).astype(np.float32)
    probabilities /= probabilities.sum(axis=0, keepdims=True)
    tuned, _ = tune_postprocess([(probabilities, instances)], "contour", MPP)  # about 3 s on one CPU core
    assert aji(instances_from_probabilities(probabilities, tuned, MPP), instances) > 0.9
