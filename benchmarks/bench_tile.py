"""Tiling throughput on one large synthetic slide, every contender measured in one run.

    python benchmarks/bench_tile.py --out bench-out [--size-px 40000] [--repeats 1]

(a) raw decode of every file tile under tissue with imagecodecs: this CPU's limit;
(b) OpenSlide read_region of the same area, tile by tile;
(c) `gsd-wsi tile` end to end (thumbnail, tissue, grid, read, write) without stain normalisation;
(d) the same with Macenko;
(c) and (d) with 1 and 2 worker processes;
(e) a cohort of smaller slides, where planning one slide overlaps reading another.
Mpx/s counts the pixels of the tiles kept; CPU-ms per Mpx is the whole machine's busy
time (every core, every process) per Mpx, so run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import tifffile

from gsd_wsi.grid import make_grid, tissue_fractions
from gsd_wsi.slide import open_slide
from gsd_wsi.stages.tile_batch import run_tile
from gsd_wsi.stages.tile_config import TileConfig
from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide
from gsd_wsi.tissue import detect_tissue

TILE_PX = 256


def kept_tiles(path: Path, config: TileConfig) -> np.ndarray:
    """Level-0 top-left corners of the tiles `tile` keeps (the same selection it makes)."""
    with open_slide(path) as slide:
        grid = make_grid(slide, config.mpp, config.tile_px, config.stride)
        thumb, scale = slide.thumbnail(config.tissue.thumb_mpp)
        tissue = detect_tissue(thumb, slide.mpp * scale[0], config.tissue)
        return grid.l0_xy[tissue_fractions(grid, tissue, scale) >= config.min_tissue]


def raw_decode(path: Path, l0_xy: np.ndarray, threads: int = 1) -> tuple[float, int]:
    """Decode every level-0 file tile under the kept tiles once, with imagecodecs."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        tile_w, tile_h = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tile_w)
        indices = set()
        for x, y in l0_xy:
            for ty in range(y // tile_h, (y + TILE_PX - 1) // tile_h + 1):
                for tx in range(x // tile_w, (x + TILE_PX - 1) // tile_w + 1):
                    indices.add(ty * across + tx)
        order = sorted(indices)
        fd = os.open(path, os.O_RDONLY)

        def decode(chunk: list[int]) -> None:
            for index in chunk:
                data = os.pread(fd, page.databytecounts[index], page.dataoffsets[index])
                page.decode(data, index, jpegtables=page.jpegtables)

        try:
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:  # imagecodecs releases the GIL
                list(pool.map(decode, [order[i::threads] for i in range(threads)]))
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
    return seconds, len(order) * tile_w * tile_h


def openslide_read(path: Path, l0_xy: np.ndarray) -> tuple[float, int]:
    with openslide.OpenSlide(path) as osr:
        start = time.perf_counter()
        for x, y in l0_xy:
            np.asarray(osr.read_region((int(x), int(y)), 0, (TILE_PX, TILE_PX)))
        seconds = time.perf_counter() - start
    return seconds, len(l0_xy) * TILE_PX * TILE_PX


def tile_end_to_end(paths: list[Path], out: Path, stain: str, workers: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    results = run_tile(paths, out, TileConfig(stain=stain, tile_px=TILE_PX), workers=workers)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    return seconds, sum(r.n_patches for r in results) * TILE_PX * TILE_PX


def cohort(folder: Path, n_slides: int, size_px: int) -> list[Path]:
    """``n_slides`` synthetic slides of ``size_px`` squared (made once, then reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(n_slides):
        path = folder / f"cohort-{size_px}-{seed}.svs"
        if not path.exists():
            write_synthetic_slide(path, SyntheticSlideSpec(width_px=size_px, height_px=size_px, mpp=0.5, seed=100 + seed))
        paths.append(path)
    return paths


def _cpu_seconds() -> float:
    """Busy CPU time of the whole machine (all cores), from /proc/stat.

    Machine-wide because worker processes descend from a fork server, not from this
    process; run the benchmark on an otherwise idle machine.
    """
    with open("/proc/stat") as fh:
        user, nice, system, idle, iowait, irq, softirq = (int(v) for v in fh.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--size-px", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=1, help="best of N for each measurement")
    parser.add_argument("--cohort-slides", type=int, default=8, help="slides of (size/4)^2 px in case (e)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)

    slide_path = args.out / f"bench-{args.size_px}.svs"
    if not slide_path.exists():
        spec = SyntheticSlideSpec(width_px=args.size_px, height_px=args.size_px, mpp=0.5, n_tissue_regions=6, seed=11)
        t0 = time.perf_counter()
        write_synthetic_slide(slide_path, spec)
        print(f"wrote {slide_path} in {time.perf_counter() - t0:.0f} s")
    l0_xy = kept_tiles(slide_path, TileConfig(tile_px=TILE_PX))
    print(f"{len(l0_xy)} tiles of {TILE_PX} px under tissue ({len(l0_xy) * TILE_PX**2 / 1e6:.0f} Mpx)")
    cohort_paths = cohort(args.out / "cohort", args.cohort_slides, args.size_px // 4)

    cases = {
        "(a) raw decode, imagecodecs, 1 core": lambda: raw_decode(slide_path, l0_xy),
        "(a2) raw decode, imagecodecs, 2 threads": lambda: raw_decode(slide_path, l0_xy, threads=2),
        "(b) OpenSlide read_region, 1 thread": lambda: openslide_read(slide_path, l0_xy),
        "(c) gsd-wsi tile, no stain norm, 1 worker": lambda: tile_end_to_end([slide_path], args.out / "c1", "none", 1),
        "(c) gsd-wsi tile, no stain norm, 2 workers": lambda: tile_end_to_end([slide_path], args.out / "c2", "none", 2),
        "(d) gsd-wsi tile, Macenko, 1 worker": lambda: tile_end_to_end([slide_path], args.out / "d1", "macenko", 1),
        "(d) gsd-wsi tile, Macenko, 2 workers": lambda: tile_end_to_end([slide_path], args.out / "d2", "macenko", 2),
        f"(e) cohort of {len(cohort_paths)} slides, Macenko, 1 worker":
            lambda: tile_end_to_end(cohort_paths, args.out / "e1", "macenko", 1),
        f"(e) cohort of {len(cohort_paths)} slides, Macenko, 2 workers":
            lambda: tile_end_to_end(cohort_paths, args.out / "e2", "macenko", 2),
    }
    rates: dict[str, float] = {}
    cpu_ms_per_mpx: dict[str, float] = {}
    for name, case in cases.items():
        runs = []
        for _ in range(args.repeats):
            cpu_before = _cpu_seconds()
            seconds, pixels = case()
            runs.append((seconds, pixels, _cpu_seconds() - cpu_before))
        seconds, pixels, cpu = min(runs)
        rates[name] = pixels / seconds / 1e6
        cpu_ms_per_mpx[name] = 1e3 * cpu / (pixels / 1e6)
        print(f"{name:45s} {seconds:7.2f} s  {rates[name]:7.1f} Mpx/s  {cpu_ms_per_mpx[name]:5.1f} CPU-ms/Mpx", flush=True)
    reference = next(iter(rates.values()))
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; slide {args.size_px}x{args.size_px} px "
        f"JPEG q90 256-px tiles, {len(l0_xy)} tiles kept",
        "",
        "| case | Mpx/s | ratio to (a) | CPU-ms per Mpx |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {rate:.1f} | {rate / reference:.2f} | {cpu_ms_per_mpx[name]:.1f} |" for name, rate in rates.items()],
    ]
    print("\n".join(lines))
    (args.out / "bench_tile.json").write_text(json.dumps({"rates_mpx_s": rates, "n_tiles": len(l0_xy)}, indent=2))


if __name__ == "__main__":
    main()
