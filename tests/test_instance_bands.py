"""gsd_wsi.instance_bands: instances labelled band by band equal those of the whole map; none
split at a band or tile border, none counted twice."""

from __future__ import annotations

import numpy as np
import pytest

from gsd_wsi.instance_bands import BandInstanceLabeller, Instance
from gsd_wsi.instances import PostprocessConfig, instances_from_probabilities
from gsd_wsi.metrics import aji
from gsd_wsi.targets import contour_target

MPP = 0.25
CONFIG = PostprocessConfig(kind="contour", min_area_um2=1.0)


def _touching_discs(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Single discs and pairs of touching discs, apart from each other, many across the 64-px grid lines."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    instances = np.zeros((height, width), np.int32)
    k = 0
    for cy in range(10, height - 10, 24):
        for cx in range(10, width - 20, 31):
            for dx in (0, 9) if rng.random() < 0.6 else (0,):
                k += 1
                r = rng.uniform(4.5, 7.0)
                disc = (yy - cy - rng.uniform(-2, 2)) ** 2 + (xx - cx - dx - rng.uniform(-2, 2)) ** 2 < r * r
                instances[disc & (instances == 0)] = k
    return instances


def _probabilities(instances: np.ndarray) -> np.ndarray:
    target = contour_target(instances, 2)
    onehot = np.stack([target == c for c in range(3)]).astype(np.float32)
    return 0.1 / 3 + 0.9 * onehot


def _run(probabilities: np.ndarray, extra: np.ndarray, band_rows: int, **kw: int):
    _, height, width = probabilities.shape
    rows: list[tuple[int, np.ndarray]] = []
    found: list[Instance] = []
    labeller = BandInstanceLabeller(width, height, CONFIG, MPP, lambda y0, ids, p: rows.append((y0, ids)),
                                    found.append, n_channels=3, n_extra=1, **kw)
    for y0 in range(0, height, band_rows):
        labeller.add(y0, probabilities[:, y0: y0 + band_rows], extra[:, y0: y0 + band_rows])
    labeller.finish()
    assert [y0 for y0, _ in rows] == list(range(0, height, kw.get("core_rows", 512)))
    return np.concatenate([ids for _, ids in rows]), found, labeller


@pytest.mark.parametrize("band_rows", [16, 48, 200])
def test_bands_and_tiles_equal_the_whole_map(band_rows: int) -> None:
    instances = _touching_discs(300, 280)
    probabilities = _probabilities(instances)
    extra = np.where(instances > 0, 0.5 + (instances % 3) * 0.1, 0.0)[None].astype(np.float32)
    whole = instances_from_probabilities(probabilities, CONFIG, MPP)
    ids, found, labeller = _run(probabilities, extra, band_rows, margin_px=24, core_rows=64, core_cols=64)
    # the same instances, each once: ids 1..n with no gap, one record per id
    assert int(ids.max()) == whole.max() == len(found) == labeller.n_instances
    assert sorted(i.id for i in found) == list(range(1, len(found) + 1))
    assert aji(ids.astype(np.int64), whole) == pytest.approx(1.0)
    assert aji(ids.astype(np.int64), instances) > 0.97
    # every record is its id's pixels, with its area and mean of the extra channel
    for record in found[::7]:
        h, w = record.mask.shape
        crop = ids[record.y0: record.y0 + h, record.x0: record.x0 + w] == record.id
        assert np.array_equal(crop, record.mask) and record.area_px == int((ids == record.id).sum())
        assert record.extra_means[0] == pytest.approx(float(extra[0][ids == record.id].mean()), abs=2e-3)
    # the grid lines are crossed by many instances, none split
    crossing = set()
    for b in range(64, 300, 64):
        rows_same = (ids[b - 1] == ids[b]) & (ids[b] > 0)
        crossing |= set(ids[b][rows_same].tolist())
        if b < 280:
            cols_same = (ids[:, b - 1] == ids[:, b]) & (ids[:, b] > 0)
            crossing |= set(ids[:, b][cols_same].tolist())
    assert len(crossing) > 20
    assert labeller.n_truncated == 0


def test_an_instance_larger_than_the_margin_is_kept_once() -> None:
    """A blob taller than the margin is cut at its owner's context: counted once, reported as truncated."""
    yy, xx = np.mgrid[:200, :120]
    instances = ((yy - 100) ** 2 / 60**2 + (xx - 60) ** 2 / 20**2 < 1).astype(np.int32)
    probabilities = _probabilities(instances)
    ids, found, labeller = _run(probabilities, np.zeros((1, 200, 120), np.float32), 32, margin_px=16, core_rows=64,
                                core_cols=64)
    assert labeller.n_instances == len(found) == 1 and labeller.n_truncated == 1
    rows = np.flatnonzero((ids > 0).any(axis=1))
    assert rows[0] == np.flatnonzero(instances.any(axis=1))[0] and rows[-1] < 64 + 16  # its owner's context


def test_glass_is_skipped_and_input_is_checked() -> None:
    rows: list[np.ndarray] = []
    labeller = BandInstanceLabeller(50, 40, CONFIG, MPP, lambda y0, ids, p: rows.append(ids), lambda i: None,
                                    n_channels=3, margin_px=8, core_rows=16, core_cols=16)
    glass = np.zeros((3, 40, 50), np.float32)
    glass[0] = 1.0
    with pytest.raises(ValueError, match="in order"):
        labeller.add(8, glass[:, :8])
    with pytest.raises(ValueError, match="expected"):
        labeller.add(0, glass[:2, :8])
    labeller.add(0, glass)
    labeller.finish()
    assert sum(r.shape[0] for r in rows) == 40 and not any(r.any() for r in rows)
    with pytest.raises(Exception, match="margin"):
        BandInstanceLabeller(50, 40, CONFIG, MPP, lambda *a: None, lambda i: None, n_channels=3, margin_px=32,
                             core_rows=16)
