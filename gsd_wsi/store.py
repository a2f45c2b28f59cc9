"""Patch stores: the zarr groups that `gsd-wsi tile` writes and training reads.

Layout of ``patches.zarr`` (zarr format 3)::

    images           uint8   (N, T, T, 3)  one patch per chunk, 64 patches per shard file
    coords           int64   (N, 2)        level-0 (x, y) of each tile's top-left corner
    tissue_fraction  float32 (N,)
    attrs["gsd_wsi"]                       slide, resolution, grid, stain parameters, version,
                                           settings hash (see `gsd_wsi.stages.tile`)

One patch per chunk lets a DataLoader read any single patch without decompressing its
neighbours, while shards keep the file count low (a 20k-patch slide is ~300 files, not
20k). Shards are written whole: writing one patch at a time into a multi-patch chunk or
shard is a read-modify-write per patch (about 32 patches/s measured).

Compression: lossless codecs gain little on H&E patches (measured on CMU-1: LZ4 1.15x at
~630 Mpx/s, zstd-1 1.28x at ~135 Mpx/s, one core), so Blosc-LZ4 without shuffle (a no-op
for bytes) is used: it saves some disk and never limits tiling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.codecs.sharding import ShardingCodec, ShardingCodecIndexLocation

from gsd_wsi.errors import StoreError

STORE_NAME = "patches.zarr"
ATTRS_KEY = "gsd_wsi"
SHARD_PATCHES = 64

_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")
_EMPTY = np.iinfo(np.uint64).max  # index entry of a chunk that is not stored


def create_store(
    path: Path, coords_l0_xy: np.ndarray, tissue_fraction: np.ndarray, tile_px: int, attrs: dict[str, Any],
    shard_patches: int = SHARD_PATCHES,
) -> None:
    """Create the arrays of a store whose images are filled later, shard by shard."""
    n = int(coords_l0_xy.shape[0])
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array(
        "images", shape=(n, tile_px, tile_px, 3), dtype="uint8",
        chunks=(1, tile_px, tile_px, 3), shards=(shard_patches, tile_px, tile_px, 3),
        compressors=_COMPRESSOR, fill_value=0,
    )
    group.create_array("coords", data=np.asarray(coords_l0_xy, np.int64), chunks=(max(n, 1), 2))
    group.create_array("tissue_fraction", data=np.asarray(tissue_fraction, np.float32), chunks=(max(n, 1),))
    group.attrs[ATTRS_KEY] = attrs | {"shard_patches": shard_patches}


def shard_ranges(n_patches: int, shard_patches: int = SHARD_PATCHES) -> list[tuple[int, int]]:
    """[start, stop) patch ranges of each shard; writers fill one range at a time."""
    return [(s, min(s + shard_patches, n_patches)) for s in range(0, n_patches, shard_patches)]


def open_images_for_writing(path: Path) -> ShardWriter:
    return ShardWriter(Path(path) / "images")


class ShardWriter:
    """Writes whole shards of an ``images`` array straight to their files.

    Why not ``array[start:stop] = patches``: zarr 3 sends every inner chunk through its
    async codec pipeline, which costs several times the LZ4 encoding itself (zarr 3.1.6:
    108 Mpx/s for the pipeline against ~630 Mpx/s for the codec), and tiling would spend
    more time storing patches than decoding the slide. The shard layout is fixed by the
    zarr v3 sharding spec: the inner chunks, each encoded by the array's own codecs, back
    to back, then the index of (offset, nbytes) little-endian uint64 pairs and its CRC32C.
    This writer is used only when the array's codecs are exactly the ones it reproduces;
    otherwise writes go through zarr. Tests read every shard back through zarr.
    """

    def __init__(self, array_path: Path) -> None:
        self.array_path = Path(array_path)
        self.array = zarr.open_array(self.array_path, mode="r+")
        self._blosc = self._fast_codec(self.array)

    @staticmethod
    def _fast_codec(array: zarr.Array) -> numcodecs.Blosc | None:
        """The Blosc codec to encode inner chunks with, or None if the layout is not the expected one."""
        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or array.dtype != np.uint8:
            return None
        sharding = codecs[0]
        inner = sharding.codecs
        if (
            sharding.chunk_shape[0] != 1 or tuple(sharding.chunk_shape[1:]) != tuple(array.shape[1:])
            or len(inner) != 2 or not isinstance(inner[0], BytesCodec) or not isinstance(inner[1], BloscCodec)
            or inner[1].blocksize != 0 or sharding.index_location != ShardingCodecIndexLocation.end
            or len(sharding.index_codecs) != 2 or not isinstance(sharding.index_codecs[0], BytesCodec)
            or sharding.index_codecs[0].endian is None or sharding.index_codecs[0].endian.value != "little"
            or not isinstance(sharding.index_codecs[1], Crc32cCodec)
        ):
            return None
        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                   "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[inner[1].shuffle.value]
        return numcodecs.Blosc(cname=inner[1].cname.value, clevel=inner[1].clevel, shuffle=shuffle)

    @property
    def shard_patches(self) -> int:
        return int(self.array.shards[0]) if self.array.shards else int(self.array.chunks[0])

    def __setitem__(self, selection: slice, patches: np.ndarray) -> None:
        """Write ``patches`` to ``images[start:stop]``; the range must be exactly one shard."""
        start, stop = selection.start, selection.stop
        shard_n = self.shard_patches
        whole_shard = start % shard_n == 0 and stop - start == min(shard_n, self.array.shape[0] - start)
        if self._blosc is None or not whole_shard:
            self.array[start:stop] = patches
            return
        parts: list[bytes] = []
        index = np.full((shard_n, 2), _EMPTY, dtype="<u8")
        offset = 0
        for i, patch in enumerate(patches):
            encoded = self._blosc.encode(np.ascontiguousarray(patch))
            parts.append(encoded)
            index[i] = (offset, len(encoded))
            offset += len(encoded)
        index_bytes = index.tobytes()
        parts += [index_bytes, google_crc32c.value(index_bytes).to_bytes(4, "little")]
        key = self.array.metadata.encode_chunk_key((start // shard_n,) + (0,) * (self.array.ndim - 1))
        shard_path = self.array_path / key
        shard_path.parent.mkdir(parents=True, exist_ok=True)
        with open(shard_path, "wb") as fh:
            fh.writelines(parts)


def read_store_attrs(path: Path) -> dict[str, Any] | None:
    """The gsd-wsi attributes of a finished store, or None if ``path`` holds none."""
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return None
    attrs = group.attrs.get(ATTRS_KEY)
    return dict(attrs) if isinstance(attrs, dict) else None


class PatchStore:
    """Read access to one patch store; a map-style dataset (``len``, ``[i]``).

    ``store[i]`` is the (T, T, 3) uint8 patch; a torch DataLoader takes the store as it is
    (numpy arrays collate to tensors). Arrays open lazily in each process, so the object
    can be handed to DataLoader workers.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        attrs = read_store_attrs(self.path)
        if attrs is None:
            raise StoreError(f"{self.path}: not a gsd-wsi patch store; make one with `gsd-wsi tile`")
        self.attrs: dict[str, Any] = attrs
        self._pid: int | None = None
        self._group: zarr.Group | None = None
        self._images: zarr.Array | None = None

    def _arrays(self) -> zarr.Group:
        if self._group is None or self._pid != os.getpid():
            self._group = zarr.open_group(self.path, mode="r")
            self._images = self._group["images"]  # held: each lookup is a metadata read
            self._pid = os.getpid()
        return self._group

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "attrs": self.attrs, "_pid": None, "_group": None, "_images": None}

    @property
    def images(self) -> zarr.Array:
        self._arrays()
        assert self._images is not None
        return self._images

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) level-0 (x, y) of each patch's top-left corner."""
        return np.asarray(self._arrays()["coords"][:])

    @property
    def tissue_fraction(self) -> np.ndarray:
        return np.asarray(self._arrays()["tissue_fraction"][:])

    @property
    def tile_px(self) -> int:
        return int(self.attrs["tile_px"])

    @property
    def slide_id(self) -> str:
        return str(self.attrs["slide_id"])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> np.ndarray:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"patch {index} out of range for a store of {n} patches")
        return np.asarray(self.images[index])

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Patches ``start:stop`` in one read (efficient for runs within a shard)."""
        return np.asarray(self.images[start:stop])

    def __repr__(self) -> str:
        return f"PatchStore({str(self.path)!r}, {len(self)} patches of {self.tile_px} px)"
