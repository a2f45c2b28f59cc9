"""`gsd-wsi tile`, one slide: tissue -> grid -> stain fit -> patches in a zarr store.

A slide goes through three steps so that its tiles can be read by several processes:
:func:`plan_slide` (open, detect tissue, lay the grid, fit the stains once for the whole
slide, create an empty store under a temporary name), :func:`fill_shards` (read, resize,
normalise and write whole shards; any process may take any shard) and :func:`finish_slide`
(rename the finished folder into place). Nothing under the final name is ever incomplete.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from gsd_wsi import __version__
from gsd_wsi.atomic import replace_dir, temporary_sibling
from gsd_wsi.grid import TileGrid, make_grid, tissue_fractions
from gsd_wsi.imageops import resize_rgb
from gsd_wsi.manifest import SlideInput
from gsd_wsi.progress import NullProgress, Progress
from gsd_wsi.qc import render_tissue_qc, save_png
from gsd_wsi.slide import Slide, open_slide
from gsd_wsi.stain import StainNormalizer, lut_pays_off, make_normalizer
from gsd_wsi.stages.batch import Status
from gsd_wsi.stages.tile_config import TileConfig, settings_hash
from gsd_wsi.store import STORE_NAME, create_store, open_images_for_writing, read_store_attrs, shard_ranges
from gsd_wsi.tissue import check_brightfield, detect_tissue

logger = logging.getLogger(__name__)

QC_NAME = "tissue.png"
_QC_LONG_SIDE_PX = 1600


@dataclass(frozen=True)
class SlideResult:
    slide_id: str
    path: Path
    status: Status
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""

    @classmethod
    def failed(cls, item: SlideInput, error: str) -> SlideResult:
        return cls(item.slide_id, item.path, "failed", error=error)

    def summary_row(self) -> dict[str, Any]:
        return {"slide_id": self.slide_id, "path": str(self.path), "status": self.status, "n_patches": self.n_patches,
                "seconds": f"{self.seconds:.2f}", "error": self.error}

    def describe(self) -> str:
        return f"{self.n_patches} patches"


@dataclass(frozen=True)
class SlidePlan:
    """Everything a process needs to fill shards of one slide's store (picklable)."""

    slide: SlideInput
    backend: str
    tmp_dir: Path
    final_dir: Path
    level: int
    level_downsample: float
    read_px: int
    tile_px: int
    n_patches: int
    stain_params: dict
    shard_patches: int
    started: float

    @property
    def store_path(self) -> Path:
        return self.tmp_dir / STORE_NAME

    @property
    def shards(self) -> list[tuple[int, int]]:
        return shard_ranges(self.n_patches, self.shard_patches)

    @property
    def stain_table(self) -> bool:
        """Normalise through the 2**24 colour table (large slides) or the float map (small)."""
        return lut_pays_off(self.n_patches * self.tile_px**2)


def read_tiles(slide: Slide, grid_level: int, read_xy: np.ndarray, read_px: int, tile_px: int) -> np.ndarray:
    """Tiles at ``read_xy`` of ``grid_level``, resized once to ``tile_px``: (N, T, T, 3) uint8."""
    out = np.empty((len(read_xy), tile_px, tile_px, 3), np.uint8)
    for i, (x, y) in enumerate(read_xy):
        region = slide.read_level_region(grid_level, (int(x), int(y)), (read_px, read_px))
        out[i] = resize_rgb(region, (tile_px, tile_px))
    return out


def plan_slide(item: SlideInput, out_dir: Path, config: TileConfig, target_rgb: np.ndarray | None,
               overwrite: bool = False, slide_dir: Path | None = None) -> SlidePlan | SlideResult:
    """Steps before reading tiles. Returns a result instead of a plan when nothing is left to do.

    The slide's outputs go to ``out_dir/<slide_id>/``, or to ``slide_dir`` when given.
    """
    started = time.perf_counter()
    config = dataclasses.replace(config, tissue=item.tissue_config(config.tissue))  # the manifest's overrides
    final_dir = Path(slide_dir) if slide_dir is not None else out_dir / item.slide_id
    with open_slide(item.path, mpp=item.mpp, backend=config.backend) as slide:  # type: ignore[arg-type]
        digest = settings_hash(config, slide.mpp, item.path.stat().st_size)
        existing = read_store_attrs(final_dir / STORE_NAME)
        if existing is not None and not overwrite:
            if existing.get("settings_hash") == digest:
                return SlideResult(item.slide_id, item.path, "skipped", int(existing.get("n_patches", 0)))
            logger.info("%s: settings changed since the existing store was made; redoing it", item.slide_id)

        grid = make_grid(slide, config.mpp, config.tile_px, config.stride)
        thumb, thumb_scale = slide.thumbnail(config.tissue.thumb_mpp)
        check_brightfield(thumb, item.slide_id)
        thumb_mpp = slide.mpp * (thumb_scale[0] + thumb_scale[1]) / 2.0
        tissue = detect_tissue(thumb, thumb_mpp, config.tissue)
        fractions = tissue_fractions(grid, tissue, thumb_scale)
        keep = fractions >= config.min_tissue if config.min_tissue > 0 else np.ones(len(fractions), bool)
        kept, kept_fractions = grid.subset(keep), fractions[keep]

        tmp_dir = temporary_sibling(final_dir)
        tmp_dir.mkdir(parents=True)
        try:
            qc_text = {"Software": f"gsd-wsi {__version__}", "slide_id": item.slide_id, "settings_hash": digest,
                       "settings": json.dumps(config.to_dict())}
            _write_qc(slide, thumb, tissue, kept, tmp_dir / QC_NAME, qc_text)
            normalizer = _fit_stains(slide, kept, config, target_rgb)
            attrs = _store_attrs(item, slide, config, kept, digest, normalizer, thumb_mpp)
            create_store(tmp_dir / STORE_NAME, kept.l0_xy, kept_fractions, config.tile_px, attrs, config.shard_patches)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        if kept.n_tiles == 0:
            logger.warning("%s: no tile has %.0f %% tissue; wrote an empty store", item.slide_id, 100 * config.min_tissue)
        return SlidePlan(
            item, slide.backend, tmp_dir, final_dir, kept.level, kept.level_downsample, kept.read_px, config.tile_px, kept.n_tiles,
            normalizer.params, config.shard_patches, started,
        )


def _fit_stains(slide: Slide, grid: TileGrid, config: TileConfig, target_rgb: np.ndarray | None) -> StainNormalizer:
    """The slide's normaliser, its source stains fitted ONCE from tiles spread across the slide."""
    normalizer = make_normalizer(config.stain, target_rgb)
    if config.stain == "none" or grid.n_tiles == 0:
        return normalizer
    n_sample = min(config.stain_sample_tiles, grid.n_tiles)
    picks = np.unique(np.linspace(0, grid.n_tiles - 1, n_sample).round().astype(np.int64))
    sample = read_tiles(slide, grid.level, grid.read_xy[picks], grid.read_px, grid.tile_px)
    return normalizer.fit_source(sample)


def _write_qc(slide: Slide, thumb: np.ndarray, tissue: np.ndarray, grid: TileGrid, path: Path,
              text: dict[str, str]) -> None:
    """The QC picture: a thumbnail about 1600 px long with the tissue outline and kept tiles.

    Made from the detection thumbnail when that is large enough, else read afresh.
    """
    l0_w, l0_h = slide.dimensions
    qc_mpp = max(slide.mpp, max(l0_w, l0_h) * slide.mpp / _QC_LONG_SIDE_PX)
    qc_w, qc_h = max(1, round(l0_w * slide.mpp / qc_mpp)), max(1, round(l0_h * slide.mpp / qc_mpp))
    if thumb.shape[1] >= qc_w:
        qc_thumb = resize_rgb(thumb, (qc_w, qc_h))
    else:
        qc_thumb, _ = slide.thumbnail(qc_mpp)
        qc_h, qc_w = qc_thumb.shape[:2]
    sx, sy = l0_w / qc_w, l0_h / qc_h
    rows = (np.arange(qc_h) * tissue.shape[0] // qc_h)[:, None]
    cols = (np.arange(qc_w) * tissue.shape[1] // qc_w)[None, :]
    boxes = np.column_stack([
        grid.l0_xy[:, 0] / sx, grid.l0_xy[:, 1] / sy,
        np.full(grid.n_tiles, grid.tile_l0_px / sx), np.full(grid.n_tiles, grid.tile_l0_px / sy),
    ])
    save_png(path, render_tissue_qc(qc_thumb, tissue[rows, cols], boxes), text)


def _store_attrs(item: SlideInput, slide: Slide, config: TileConfig, grid: TileGrid, digest: str,
                 normalizer: StainNormalizer, thumb_mpp: float) -> dict:
    return {
        "slide_id": item.slide_id,
        "slide_path": str(item.path.resolve()),
        "slide_mpp": slide.mpp,
        "slide_dimensions": list(slide.dimensions),
        "reader": slide.backend,
        "target_mpp": config.mpp,
        "tile_mpp": grid.tile_mpp,
        "tile_px": config.tile_px,
        "stride_px": config.stride,
        "level": grid.level,
        "level_downsample": grid.level_downsample,
        "read_px": grid.read_px,
        "min_tissue": config.min_tissue,
        "tissue_thumb_mpp": thumb_mpp,
        "n_patches": grid.n_tiles,
        "stain": normalizer.params,
        "settings": config.to_dict(),
        "settings_hash": digest,
        "gsd_wsi_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class _OpenSlideCache(threading.local):
    """One open slide and its normaliser per thread, reused across that slide's shards.

    Per thread, not per process: a cohort worker with several threads tiles several slides
    at once, and one slide's finish must not close another's reader."""

    def __init__(self) -> None:
        self.key: Path | None = None
        self.slide: Slide | None = None
        self.normalizer: StainNormalizer | None = None

    def get(self, plan: SlidePlan) -> tuple[Slide, StainNormalizer]:
        if self.key != plan.tmp_dir or self.slide is None or self.normalizer is None:
            self.close()
            self.slide = open_slide(plan.slide.path, mpp=plan.slide.mpp, backend=plan.backend)  # type: ignore[arg-type]
            self.normalizer = StainNormalizer.from_params(plan.stain_params)
            if self.normalizer.is_fitted and plan.stain_table:  # build it before the fill threads share it
                self.normalizer.transform(np.zeros((1, 1, 3), np.uint8))
            self.key = plan.tmp_dir
        return self.slide, self.normalizer

    def close(self) -> None:
        if self.slide is not None:
            self.slide.close()
        self.key, self.slide, self.normalizer = None, None, None


_cache = _OpenSlideCache()


#: Threads per process that fill shards. Each takes a whole shard through every step (read,
#: normalise, encode, write); the JPEG codec, the colour lookup, the LZ4 codec and file
#: writes all release the GIL, so two shards progress at once and the threads share the
#: work evenly whatever its mix. (A fixed split, a reading thread and a writing thread,
#: leaves one of them idle: the reader when decoding is cheap, as with YCbCr 4:2:0 JPEG,
#: the writer when the colour lookup doubles the reading work.)
FILL_THREADS = 2

#: Readers whose ``read_level_region`` may be called from several threads at once; reads
#: from any other take turns (the steps after reading still overlap).
_THREAD_SAFE_READERS = frozenset({"tifffile", "openslide", "image"})


def fill_shards(
    plan: SlidePlan, shard_indices: list[int], read_xy: np.ndarray, on_shard: Callable[[int], None] | None = None,
    threads: int = FILL_THREADS,
) -> int:
    """Read, normalise and write the given shards; ``read_xy`` holds their tiles' positions
    (in shard order, concatenated). Returns the number of patches written.

    ``threads`` shards are in progress at a time (see :data:`FILL_THREADS`), so memory stays
    at a few shards. ``on_shard`` is called from this thread with each shard's patch count.
    """
    slide, normalizer = _cache.get(plan)
    images = open_images_for_writing(plan.store_path)
    shards = plan.shards
    read_lock = nullcontext() if slide.backend in _THREAD_SAFE_READERS else threading.Lock()

    def fill(start: int, stop: int, xy: np.ndarray) -> int:
        with read_lock:
            tiles = read_tiles(slide, plan.level, xy, plan.read_px, plan.tile_px)
        images[start:stop] = normalizer.transform(tiles, use_lut=plan.stain_table)
        return stop - start

    jobs: list[tuple[int, int, np.ndarray]] = []
    offset = 0
    for index in shard_indices:
        start, stop = shards[index]
        jobs.append((start, stop, read_xy[offset : offset + stop - start]))
        offset += stop - start
    running: set[Future[int]] = set()

    def collect(until: int) -> None:
        """Wait until at most ``until`` shards are in progress; a failure raises here."""
        nonlocal running
        while len(running) > until:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                n_patches = future.result()
                if on_shard is not None:
                    on_shard(n_patches)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gsd-wsi-fill") as pool:
        for job in jobs:
            collect(max(1, threads) - 1)
            running.add(pool.submit(fill, *job))
        collect(0)
    return offset


def finish_slide(plan: SlidePlan) -> SlideResult:
    """Move the finished folder into place; from here on the slide counts as done."""
    _cache.close()
    replace_dir(plan.tmp_dir, plan.final_dir)
    status: Status = "ok" if plan.n_patches else "no_tissue"
    return SlideResult(plan.slide.slide_id, plan.slide.path, status, plan.n_patches, time.perf_counter() - plan.started)


def abandon_slide(plan: SlidePlan) -> None:
    _cache.close()
    shutil.rmtree(plan.tmp_dir, ignore_errors=True)


def tile_slide(item: SlideInput, out_dir: Path, config: TileConfig, target_rgb: np.ndarray | None = None,
               overwrite: bool = False, slide_dir: Path | None = None, progress: Progress | None = None,
               threads: int = FILL_THREADS) -> SlideResult:
    """One slide from start to finish in this process (plan, fill every shard, finish)."""
    progress = progress or NullProgress()
    planned = plan_slide(item, out_dir, config, target_rgb, overwrite, slide_dir)
    if isinstance(planned, SlideResult):
        return planned
    try:
        progress.slide_started(item.slide_id, planned.n_patches)
        fill_shards(planned, list(range(len(planned.shards))), planned_read_xy(planned), on_shard=progress.tiles_done,
                    threads=threads)
        return finish_slide(planned)
    except Exception:  # an interruption leaves its temporary to the next run's clean-up, as a kill does
        abandon_slide(planned)
        raise


def planned_read_xy(plan: SlidePlan) -> np.ndarray:
    """Positions (pixels of the level read) of every tile of a planned store, from its coords."""
    l0_xy = np.asarray(zarr.open_array(plan.store_path / "coords", mode="r")[:])
    # l0 = rint(read * ds) with ds >= 1, so rint(l0 / ds) recovers read exactly.
    return np.rint(l0_xy / plan.level_downsample).astype(np.int64).reshape(-1, 2)
