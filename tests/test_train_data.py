"""Training data: finding stores, the slide-wise split, the epoch sampler, patch tensors."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gsd_wsi.errors import ConfigError, StoreError
from gsd_wsi.store import PatchStore, create_store, open_images_for_writing, shard_ranges
from gsd_wsi.train.data import EpochSampler, PatchDataset, find_stores, index_patches, make_loader


def _make_store(path: Path, slide_id: str, rows: int = 4, cols: int = 5, tile_px: int = 16, seed: int = 0,
                stride_px: int | None = None) -> np.ndarray:
    """A store of a rows x cols grid of random patches (coords on a stride lattice), row-major."""
    n = rows * cols
    images = np.random.default_rng(seed).integers(0, 256, (n, tile_px, tile_px, 3), dtype=np.uint8)
    if n:
        images[0, 0, 0] = (0, 255, 128)  # the extremes of the [-1, 1] scaling
    yy, xx = np.divmod(np.arange(n), cols)
    coords = np.stack([xx, yy], axis=1).astype(np.int64) * (stride_px or tile_px)
    create_store(path, coords, np.ones(n), tile_px, {"slide_id": slide_id, "tile_px": tile_px}, shard_patches=8)
    writer = open_images_for_writing(path)
    for start, stop in shard_ranges(n, 8):
        writer[start:stop] = images[start:stop]
    return images


@pytest.fixture
def cohort(tmp_path: Path) -> list[Path]:
    """Five one-slide stores laid out as `gsd-wsi tile` does: <out>/<slide_id>/patches.zarr."""
    paths = []
    for i in range(5):
        path = tmp_path / "tiles" / f"slide{i}" / "patches.zarr"
        _make_store(path, f"slide{i}", rows=2, cols=3 + i, seed=i)
        paths.append(path)
    return paths


def test_find_stores_in_folder(tmp_path: Path) -> None:
    a = tmp_path / "out" / "a" / "patches.zarr"
    b = tmp_path / "out" / "nested" / "b" / "patches.zarr"
    _make_store(a, "a")
    _make_store(b, "b")
    (tmp_path / "out" / "notes").mkdir()
    (tmp_path / "out" / "plain.zarr").mkdir()  # named like a store, but is not one
    _make_store(tmp_path / "out" / ".tmp-c.0123" / "patches.zarr", "c")  # an interrupted run's leftover
    assert find_stores([tmp_path / "out"]) == [a.resolve(), b.resolve()]
    assert find_stores([str(b), tmp_path / "out", a]) == [a.resolve(), b.resolve()]  # deduplicated, sorted


def test_find_stores_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no patch stores given"):
        find_stores([])
    with pytest.raises(StoreError, match="no such file"):
        find_stores([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a patch store.*gsd-wsi tile"):
        find_stores([tmp_path / "empty"])
    (tmp_path / "slide.svs").write_bytes(b"not a store")
    with pytest.raises(StoreError, match="not a patch store"):
        find_stores([tmp_path / "slide.svs"])


def test_index_errors(tmp_path: Path, cohort: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "e" / "patches.zarr"
    _make_store(empty, "e", rows=0)
    with pytest.raises(StoreError, match="no patches in"):
        index_patches([empty])
    with caplog.at_level(logging.WARNING):
        index = index_patches([empty, *cohort])
    assert "no patches" in caplog.text and empty.resolve() not in index.stores and len(index.stores) == 5
    big = tmp_path / "big" / "patches.zarr"
    _make_store(big, "big", rows=1, cols=2, tile_px=32)
    with pytest.raises(StoreError, match=r"different patch sizes \(16 px: .*slide0.* and 2 more; 32 px: .*big"):
        index_patches([*cohort, big])
    for bad in (-0.1, 0.6, float("nan"), True):
        with pytest.raises(ConfigError, match="val_fraction"):
            index_patches(cohort, val_fraction=bad)


def test_split_by_slide(cohort: list[Path]) -> None:
    index = index_patches(cohort, val_fraction=0.4, seed=3)
    assert index.tile_px == 16 and index.train.dtype == np.int64 and index.train.shape[1] == 2
    train_stores, val_stores = set(index.train[:, 0]), set(index.val[:, 0])
    assert len(val_stores) == 2 and not train_stores & val_stores and train_stores | val_stores == set(range(5))
    assert index.val_slides == tuple(PatchStore(index.stores[i]).slide_id for i in sorted(val_stores))
    total = sum(len(PatchStore(p)) for p in cohort)
    assert len(index.train) + len(index.val) == total
    assert len({tuple(r) for r in np.concatenate([index.train, index.val])}) == total  # every patch once
    again = index_patches(list(reversed(cohort)), val_fraction=0.4, seed=3)
    assert again.val_slides == index.val_slides and np.array_equal(again.val, index.val)
    assert index_patches(cohort, val_fraction=0.01).val_slides != ()  # at least one slide held out
    none = index_patches(cohort, val_fraction=0)
    assert none.val.shape == (0, 2) and none.val_slides == () and len(none.train) == total


@pytest.mark.parametrize("stride_px", [16, 8])
def test_single_store_holds_out_bottom_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture, stride_px: int) -> None:
    path = tmp_path / "only" / "patches.zarr"
    _make_store(path, "only", rows=10, cols=4, stride_px=stride_px)
    with caplog.at_level(logging.WARNING):
        index = index_patches([path], val_fraction=0.2)
    assert "only one slide" in caplog.text and index.val_slides == ()
    y = PatchStore(path).coords[:, 1]
    train_y, val_y = y[index.train[:, 1]], y[index.val[:, 1]]
    assert len(index.val) == 8 and len(index.train) == (32 if stride_px == 16 else 28)  # overlapping row dropped
    assert val_y.min() >= train_y.max() + 16  # whole rows below, no overlap with any 16-px training patch


def test_sampler_deterministic() -> None:
    def batches(seed: int, epoch: int) -> list[tuple[int, int]]:
        sampler = EpochSampler(50, batch_size=4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = batches(0, 1)
    assert first == batches(0, 1) and len(first) == 48
    assert first != batches(0, 2) and first != batches(1, 1)
    assert sorted(p for p, _ in first) != [p for p, _ in first] and {f for _, f in first} == {0, 1, 2, 3}
    plain = list(EpochSampler(10, batch_size=4, seed=0, shuffle=False, augment=False, drop_last=False))
    assert plain == [(i, 0) for i in range(10)]
    assert EpochSampler(10, batch_size=4, seed=0, drop_last=False).batches_per_epoch() == 3


def test_sampler_ranks_partition_the_epoch() -> None:
    ranks = [EpochSampler(103, batch_size=5, seed=7, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    parts = [list(s) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == 50 and ranks[0].batches_per_epoch() == 10 == len(ranks[0]) // 5
    assert not {p for p, _ in parts[0]} & {p for p, _ in parts[1]}
    whole = EpochSampler(103, batch_size=5, seed=7, drop_last=False)
    whole.set_epoch(3)
    interleaved = [item for pair in zip(*parts) for item in pair]
    assert interleaved == list(whole)[:100]  # the single-process epoch, truncated, dealt out in turn
    with pytest.raises(ConfigError, match="too few patches"):
        EpochSampler(9, batch_size=5, seed=0, world_size=2)


def test_skip_batches_resumes_mid_epoch() -> None:
    sampler = EpochSampler(40, batch_size=4, seed=1, rank=1, world_size=2)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.skip_batches(3)
    assert len(sampler) == len(full) - 12
    assert list(sampler) == full[12:]
    assert list(sampler) == full  # the skip applies to one iteration only
    with pytest.raises(ConfigError):
        sampler.skip_batches(sampler.batches_per_epoch() + 1)


def test_dataset_flips_and_scaling(tmp_path: Path) -> None:
    path = tmp_path / "s" / "patches.zarr"
    images = _make_store(path, "s")
    rows = np.stack([np.zeros(20, np.int64), np.arange(20)[::-1]], axis=1)  # position i -> patch 19 - i
    dataset = PatchDataset(rows, [path], image_size=16, tile_px=16)
    assert len(dataset) == 20
    flips = {0: lambda a: a, 1: lambda a: a[:, ::-1], 2: lambda a: a[::-1], 3: lambda a: a[::-1, ::-1]}
    for code, flip in flips.items():
        got = dataset[(2, code)]
        assert got.dtype == torch.float32 and got.shape == (3, 16, 16)
        expected = flip(images[17]).transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1)
        np.testing.assert_array_equal(got.numpy(), expected)
    corner = dataset[(19, 0)][:, 0, 0].tolist()
    assert corner == [-1.0, 1.0, float(np.float32(128) / np.float32(127.5) - np.float32(1))]
    blob = pickle.dumps(dataset)
    assert len(blob) < 4096 and pickle.loads(blob)._stores == {}


def test_dataset_resizes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s" / "patches.zarr"
    images = _make_store(path, "s", rows=1, cols=2, tile_px=32)
    rows = np.array([[0, 0], [0, 1]])
    with caplog.at_level(logging.INFO):
        small = PatchDataset(rows, [path], image_size=16, tile_px=32)
    assert "resized from 32 to 16" in caplog.text
    down = small[(1, 0)]
    assert down.shape == (3, 16, 16) and down.min() >= -1 and down.max() <= 1
    block_means = images[1].reshape(16, 2, 16, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1) / 127.5 - 1
    assert np.abs(down.numpy() - block_means).mean() < 0.15  # a low-pass of the patch, not a subsample
    up = PatchDataset(rows, [path], image_size=48, tile_px=32)[(0, 3)]
    assert up.shape == (3, 48, 48) and up.min() >= -1 and up.max() <= 1
    with pytest.raises(StoreError, match="patches are 32 px, expected 16"):
        PatchDataset(rows, [path], image_size=16, tile_px=16)[(0, 0)]


def test_loader_same_batches_with_workers(cohort: list[Path]) -> None:
    index = index_patches(cohort, val_fraction=0)
    dataset = PatchDataset(index.train, index.stores, image_size=16, tile_px=index.tile_px)
    dataset[(0, 0)]  # stores opened in the parent: workers must reopen their own

    def run(num_workers: int, helper: bool) -> list[torch.Tensor]:
        sampler = EpochSampler(len(dataset), batch_size=8, seed=2)
        sampler.set_epoch(1)
        if helper:
            loader = make_loader(dataset, sampler, num_workers=num_workers)
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=num_workers)
        return list(loader)

    serial = run(0, helper=True)
    assert len(serial) == len(dataset) // 8 and serial[0].shape == (8, 3, 16, 16)
    for got in (run(2, helper=True), run(2, helper=False)):
        assert len(got) == len(serial) and all(torch.equal(a, b) for a, b in zip(got, serial))
