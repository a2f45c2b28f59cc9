"""Training data from patch stores: which patches, in which order, as which tensors.

- :func:`find_stores` turns command-line paths into the patch stores under them.
- :func:`index_patches` lists every patch as a (store, patch) row and holds out whole
  slides for validation, so validation never sees tissue that training saw.
- :class:`PatchDataset` reads one row as a float tensor in [-1, 1], flipped and resized.
- :class:`EpochSampler` orders an epoch: a permutation and flip codes drawn from a
  generator seeded with (seed, epoch), split across ranks like ``DistributedSampler``.
  Order and augmentation are a function of (seed, epoch, rank) alone, so a run that is
  resumed mid-epoch (:meth:`EpochSampler.skip_batches`) sees exactly the batches it would
  have seen.

Sampling is uniformly random over all patches; there is no sampler that reads runs of
neighbouring patches to amortise decompression, because each patch is its own zarr chunk
in our stores (64-patch shards are only a file grouping): reading any single patch
decompresses that patch alone. Stores open lazily in each process (``PatchStore`` reopens
after a fork), and the dataset pickles as paths plus the (N, 2) index, for DataLoader workers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gsd_wsi.atomic import TMP_PREFIX
from gsd_wsi.errors import ConfigError, StoreError
from gsd_wsi.store import PatchStore, read_store_attrs

log = logging.getLogger(__name__)

MAX_VAL_FRACTION = 0.5


def find_stores(paths: Sequence[str | Path]) -> list[Path]:
    """The patch stores named by ``paths`` (stores, or folders searched recursively); sorted, unique."""
    if not paths:
        raise StoreError("no patch stores given: pass patches.zarr stores or folders made by `gsd-wsi tile`")
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise StoreError(f"{path}: no such file or folder; pass patch stores made by `gsd-wsi tile`")
        if path.is_dir() and read_store_attrs(path) is not None:
            found.add(path.resolve())
            continue
        inside = _stores_under(path) if path.is_dir() else []
        if not inside:
            raise StoreError(f"{path}: not a patch store and holds none; make one with `gsd-wsi tile`")
        found.update(inside)
    return sorted(found)


def _stores_under(folder: Path) -> list[Path]:
    """Stores named ``*.zarr`` below ``folder``, not descending into stores or unfinished outputs."""
    stores = []
    for root, dirs, _ in os.walk(folder, followlinks=True):
        keep = []
        for name in sorted(dirs):
            if name.startswith(TMP_PREFIX):
                continue  # an interrupted `gsd-wsi tile` left it; its images may be unwritten
            sub = Path(root) / name
            if name.endswith(".zarr") and read_store_attrs(sub) is not None:
                stores.append(sub.resolve())
            else:
                keep.append(name)
        dirs[:] = keep
    return stores


@dataclass(frozen=True)
class PatchIndex:
    """Which patches the training and validation sets use: rows of (store_index, patch_index)."""

    stores: tuple[Path, ...]
    train: np.ndarray  # (N, 2) int64
    val: np.ndarray  # (M, 2) int64
    tile_px: int
    val_slides: tuple[str, ...]  # slide ids held out whole; empty for a single-slide split


def index_patches(stores: Sequence[Path], val_fraction: float = 0.1, seed: int = 0) -> PatchIndex:
    """Index every patch of ``stores`` and hold out ``val_fraction`` of the slides for validation.

    With one slide, none can be held out: the bottom rows of patches (largest y) become the
    validation set, and training patches overlapping them are dropped.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, Real) \
            or not 0.0 <= val_fraction <= MAX_VAL_FRACTION:
        raise ConfigError(f"val_fraction={val_fraction!r}: expected a fraction in [0, {MAX_VAL_FRACTION}]")
    opened: list[PatchStore] = []
    for path in sorted({Path(p).resolve() for p in stores}):
        store = PatchStore(path)
        if len(store) == 0:
            log.warning("%s: store has no patches; skipping it", path)
        else:
            opened.append(store)
    if not opened:
        raise StoreError(f"no patches in {_some([Path(p) for p in stores]) or 'no stores'}; "
                         "tile slides with tissue, or lower --min-tissue of `gsd-wsi tile`")
    sizes = {s.tile_px for s in opened}
    if len(sizes) > 1:
        by_size = {size: [s.path for s in opened if s.tile_px == size] for size in sorted(sizes)}
        listing = "; ".join(f"{size} px: {_some(paths)}" for size, paths in by_size.items())
        raise StoreError(f"stores have different patch sizes ({listing}); one run trains on one tile size, "
                         "so pass stores tiled with the same --tile-px")
    counts = [len(s) for s in opened]
    rows = [np.stack([np.full(n, i, np.int64), np.arange(n, dtype=np.int64)], axis=1) for i, n in enumerate(counts)]
    empty = np.zeros((0, 2), np.int64)
    val_slides: tuple[str, ...] = ()
    if val_fraction == 0:
        train, val = np.concatenate(rows), empty
    elif len(opened) >= 2:
        n_val = min(max(1, round(val_fraction * len(opened))), len(opened) - 1)
        picked = set(np.random.default_rng(seed).choice(len(opened), size=n_val, replace=False).tolist())
        train = np.concatenate([r for i, r in enumerate(rows) if i not in picked])
        val = np.concatenate([r for i, r in enumerate(rows) if i in picked])
        val_slides = tuple(_slide_id(opened[i]) for i in sorted(picked))
    else:
        log.warning("%s: only one slide, so no slide can be held out for validation; holding out the "
                    "bottom %.0f %% of its patches instead (tissue of one slide is correlated: pass more "
                    "slides for an honest validation loss)", opened[0].path, 100 * val_fraction)
        train_idx, val_idx = _spatial_holdout(opened[0], val_fraction)
        train, val = rows[0][train_idx], rows[0][val_idx]
    return PatchIndex(tuple(s.path for s in opened), train, val, sizes.pop(), val_slides)


def _some(paths: list[Path], shown: int = 3) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(str(p) for p in paths[:shown]) + more


def _slide_id(store: PatchStore) -> str:
    return str(store.attrs.get("slide_id", store.path.parent.name))


def _spatial_holdout(store: PatchStore, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) patch indices: val is the block of whole rows with the largest y (columns of
    largest x for a single row); training patches whose footprint reaches into it are dropped."""
    coords = store.coords
    footprint_l0 = float(store.attrs.get("read_px", store.tile_px)) * float(store.attrs.get("level_downsample", 1.0))
    want = max(1, round(val_fraction * len(coords)))
    for axis in (1, 0):
        values = coords[:, axis]
        cuts = np.unique(values)[1:]  # the smallest value always stays in training
        if len(cuts) == 0:
            continue
        n_at_or_above = len(values) - np.searchsorted(np.sort(values), cuts, side="left")
        cut = cuts[int(np.argmin(np.abs(n_at_or_above - want)))]
        val = np.flatnonzero(values >= cut)
        train = np.flatnonzero(values + footprint_l0 <= cut)
        if len(train):
            return train, val
    raise StoreError(f"{store.path}: too few patches to hold out a separate block for validation; "
                     "pass more slides or val_fraction=0")


class PatchDataset(torch.utils.data.Dataset):
    """Patches as float32 (3, S, S) tensors in [-1, 1]; items are (row position, flip code).

    Flip code bit 0 flips horizontally, bit 1 vertically. Patches of ``tile_px`` other than
    ``image_size`` are resized (antialiased when shrinking).
    """

    def __init__(self, index_rows: np.ndarray, stores: Sequence[Path], image_size: int, tile_px: int) -> None:
        rows = np.asarray(index_rows)
        if rows.ndim != 2 or rows.shape[1] != 2 or not np.issubdtype(rows.dtype, np.integer):
            raise ConfigError(f"index_rows must be an (N, 2) integer array (got {rows.dtype} {rows.shape})")
        if len(rows) and not (0 <= rows[:, 0].min() and rows[:, 0].max() < len(stores)):
            raise ConfigError(f"index_rows name stores outside the {len(stores)} given")
        for name, value in (("image_size", image_size), ("tile_px", tile_px)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive number of pixels")
        self.rows = rows.astype(np.int64, copy=False)
        self.paths = tuple(Path(p) for p in stores)
        self.image_size, self.tile_px = int(image_size), int(tile_px)
        self._stores: dict[int, PatchStore] = {}
        if self.tile_px != self.image_size:
            log.info("patches are resized from %d to %d px (%s)", self.tile_px, self.image_size,
                     "antialiased" if self.image_size < self.tile_px else "bilinear")

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_stores": {}}

    def __len__(self) -> int:
        return len(self.rows)

    def _store(self, i: int) -> PatchStore:
        store = self._stores.get(i)
        if store is None:
            store = self._stores[i] = PatchStore(self.paths[i])
            if store.tile_px != self.tile_px:
                raise StoreError(f"{store.path}: patches are {store.tile_px} px, expected {self.tile_px}; "
                                 "index the stores again")
        return store

    def __getitem__(self, item: tuple[int, int] | int) -> torch.Tensor:
        position, flip = (item, 0) if isinstance(item, (int, np.integer)) else item
        if not 0 <= flip <= 3:
            raise ConfigError(f"flip code {flip!r}: expected 0-3 (bit 0 horizontal, bit 1 vertical)")
        store_i, patch_i = self.rows[position]
        patch = self._store(int(store_i))[int(patch_i)]  # (T, T, 3) uint8
        if flip & 1:
            patch = patch[:, ::-1]
        if flip & 2:
            patch = patch[::-1]
        x = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))).to(torch.float32)
        x = x / 127.5 - 1.0
        if self.image_size != self.tile_px:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                              antialias=self.image_size < self.tile_px)[0].clamp_(-1.0, 1.0)
        return x


class EpochSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """This rank's (position, flip code) items of an epoch, deterministic in (seed, epoch).

    With ``drop_last`` the epoch is truncated so that every rank gets the same whole number
    of batches; without it, ranks are padded by wrapping around (as ``DistributedSampler``)
    and the last batch may be short. Use with :func:`make_loader`, or a DataLoader whose
    ``batch_size`` is this sampler's.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, augment: bool = True, drop_last: bool = True) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or n_items < 0 or seed < 0:
            raise ConfigError(f"EpochSampler(n_items={n_items}, batch_size={batch_size}, seed={seed}, "
                              f"rank={rank}, world_size={world_size}): expected n_items >= 0, batch_size >= 1, "
                              "seed >= 0 and 0 <= rank < world_size")
        if drop_last and n_items < world_size * batch_size:
            raise ConfigError(f"too few patches ({n_items}) for batch size {batch_size} on {world_size} "
                              f"process(es): one step needs {world_size * batch_size}; lower the batch size "
                              "or the number of processes, or tile more slides")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.epoch = 0
        self._skip = 0

    @property
    def items_per_rank(self) -> int:
        if self.drop_last:
            return self.n_items // (self.world_size * self.batch_size) * self.batch_size
        return math.ceil(self.n_items / self.world_size)

    def batches_per_epoch(self) -> int:
        return math.ceil(self.items_per_rank / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ConfigError(f"epoch={epoch!r}: expected a non-negative number")
        self.epoch = epoch

    def skip_batches(self, n_batches: int) -> None:
        """Start the next iteration after ``n_batches`` of this rank's batches of the current epoch."""
        if not 0 <= n_batches <= self.batches_per_epoch():
            raise ConfigError(f"cannot skip {n_batches} batches of an epoch of {self.batches_per_epoch()}")
        self._skip = n_batches

    def epoch_items(self) -> np.ndarray:
        """(n, 2) rows of (position, flip code) of this rank's whole current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n_items) if self.shuffle else np.arange(self.n_items)
        flips = rng.integers(0, 4, self.n_items) if self.augment else np.zeros(self.n_items, np.int64)
        pairs = np.stack([order, flips], axis=1).astype(np.int64)
        total = self.items_per_rank * self.world_size
        if total > len(pairs) and len(pairs):
            pairs = np.concatenate([pairs] * math.ceil(total / len(pairs)))
        return pairs[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        items = self.epoch_items()[self._skip * self.batch_size :]
        self._skip = 0
        return iter([(int(p), int(f)) for p, f in items])

    def __len__(self) -> int:
        """Items the next iteration yields (fewer than an epoch after :meth:`skip_batches`)."""
        return max(0, self.items_per_rank - self._skip * self.batch_size)


def make_loader(dataset: PatchDataset, sampler: EpochSampler, num_workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader yielding the sampler's batches in order, whatever ``num_workers``."""
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r}: expected 0 or more")
    extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 4} if num_workers else {}
    return torch.utils.data.DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler,
                                       num_workers=num_workers, pin_memory=pin_memory, drop_last=False, **extra)
