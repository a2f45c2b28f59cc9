"""Patch stores: round trip, chunking for random access, use as a torch dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gsd_wsi.errors import StoreError
from gsd_wsi.store import PatchStore, create_store, open_images_for_writing, read_store_attrs, shard_ranges


def _make_store(path: Path, n: int = 70, tile_px: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, tile_px, tile_px, 3), dtype=np.uint8)
    coords = np.stack([np.arange(n) * tile_px, np.zeros(n)], axis=1).astype(np.int64)
    create_store(path, coords, np.linspace(0.5, 1, n), tile_px, {"slide_id": "s1", "tile_px": tile_px}, shard_patches=16)
    array = open_images_for_writing(path)
    for start, stop in shard_ranges(n, 16):
        array[start:stop] = images[start:stop]
    return images


def test_round_trip(tmp_path: Path) -> None:
    images = _make_store(tmp_path / "p.zarr")
    store = PatchStore(tmp_path / "p.zarr")
    assert len(store) == 70 and store.tile_px == 32 and store.slide_id == "s1"
    np.testing.assert_array_equal(store[5], images[5])
    np.testing.assert_array_equal(store[-1], images[-1])
    np.testing.assert_array_equal(store.read_range(10, 40), images[10:40])
    assert store.coords.shape == (70, 2) and store.coords.dtype == np.int64
    assert store.tissue_fraction.dtype == np.float32
    assert store.images.chunks == (1, 32, 32, 3)
    assert store.attrs["shard_patches"] == 16
    with pytest.raises(IndexError):
        store[70]


def test_shard_ranges() -> None:
    assert shard_ranges(0) == []
    assert shard_ranges(130, 64) == [(0, 64), (64, 128), (128, 130)]


def test_not_a_store(tmp_path: Path) -> None:
    assert read_store_attrs(tmp_path / "missing.zarr") is None
    with pytest.raises(StoreError, match="gsd-wsi tile"):
        PatchStore(tmp_path)


def test_torch_dataloader_with_workers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    images = _make_store(tmp_path / "p.zarr")
    store = PatchStore(tmp_path / "p.zarr")
    len(store)  # open arrays in the parent: workers must reopen their own
    loader = torch.utils.data.DataLoader(store, batch_size=10, num_workers=2, shuffle=False)
    batches = [b for b in loader]
    got = torch.cat(batches).numpy()
    np.testing.assert_array_equal(got, images)


def test_direct_shard_writer_matches_zarr(tmp_path: Path) -> None:
    """Shards written directly read back through zarr; a partial range falls back to zarr."""
    images = _make_store(tmp_path / "p.zarr", n=70)  # 4 full shards of 16 and one of 6
    writer = open_images_for_writing(tmp_path / "p.zarr")
    assert writer._blosc is not None  # the fast path was taken
    np.testing.assert_array_equal(np.asarray(writer.array[:]), images)
    shard_files = sorted((tmp_path / "p.zarr" / "images" / "c").rglob("0"))
    assert len([p for p in shard_files if p.is_file()]) == 5
    writer[3:5] = images[:2]  # not a whole shard: zarr's own read-modify-write
    got = PatchStore(tmp_path / "p.zarr")
    np.testing.assert_array_equal(got[3], images[0])
    np.testing.assert_array_equal(got[5], images[5])
