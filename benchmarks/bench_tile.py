"""Tiling throughput on large synthetic slides, every contender measured in one run.

    python benchmarks/bench_tile.py --out bench-out [--repeats 3] [--slides svs,tiff-rgb,tiff-ycbcr]

Slides (generated once under --out, then reused):
  svs         Aperio SVS, 40000 px square, JPEG in RGB colour space (no chroma subsampling);
  tiff-rgb    generic tiled TIFF, 32000 px square, the same JPEG kind;
  tiff-ycbcr  the same TIFF with YCbCr 4:2:0 JPEG tiles (tifffile's default for JPEG, and
              what most scanners write): half the samples per pixel to decode;
  tiff-rgb-flat  level 0 of tiff-rgb alone (the same JPEG bytes), no pyramid, as a TIFF
              written with a plain tifffile.imwrite: the thumbnail decodes the whole slide.
For each slide:
(a)  raw decode of every file tile under the kept tiles, bytes already in memory,
     imagecodecs.jpeg8_decode on one thread: this CPU's limit, the reference of every ratio;
(a') the same, each tile read from the file (pread, page cache) just before it is decoded;
(a2) (a) on 2 threads;
(b)  OpenSlide read_region of the same area, tile by tile;
(c)  run_tile in process (thumbnail, tissue, grid, read, write) without stain normalisation;
(d)  the same with Macenko;
(c) and (d) with 1 and 2 worker processes;
(f)  the whole `gsd-wsi tile` command in a subprocess, start-up included, 1 and 2 workers;
and the fixed cost of a command, apart: interpreter and imports, thumbnail, tissue
detection, QC picture and stain fit (planning), the colour table.
For the SVS only: (e) a cohort of smaller slides, where planning one slide overlaps reading
another.
Mpx/s counts the pixels of the tiles kept; CPU-ms per Mpx is the whole machine's busy
time (every core, every process) per Mpx, so run it on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile

from machine import cpu_model, cpu_seconds, wait_for_idle  # benchmarks/machine.py
from gsd_wsi.grid import make_grid, tissue_fractions
from gsd_wsi.manifest import collect_inputs
from gsd_wsi.slide import open_slide
from gsd_wsi.stages.tile import SlidePlan, abandon_slide, plan_slide
from gsd_wsi.stages.tile_batch import run_tile
from gsd_wsi.stages.tile_config import TileConfig
from gsd_wsi.stain import StainNormalizer
from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide
from gsd_wsi.tissue import detect_tissue

TILE_PX = 256
SLIDES = ("svs", "tiff-rgb", "tiff-ycbcr", "tiff-rgb-flat")


def slide_spec(name: str, args: argparse.Namespace) -> tuple[str, SyntheticSlideSpec]:
    """File name and spec of one benchmark slide (for the flat TIFF: of the slide it copies)."""
    if name == "svs":
        size = args.svs_size_px
        return f"bench-{size}.svs", SyntheticSlideSpec(width_px=size, height_px=size, mpp=0.5, n_tissue_regions=6, seed=11)
    colour = name.removeprefix("tiff-").removesuffix("-flat")
    size = args.tiff_size_px
    flat = "-flat" if name.endswith("-flat") else ""
    return f"bench-{size}-{colour}{flat}.tiff", SyntheticSlideSpec(
        width_px=size, height_px=size, mpp=0.5, n_tissue_regions=1, seed=1, fmt="tiff", jpeg_colour=colour)  # type: ignore[arg-type]


def write_without_pyramid(source: Path, path: Path) -> None:
    """Level 0 of ``source`` alone, its JPEG tiles copied byte for byte."""
    with tifffile.TiffFile(source) as tif:
        page = tif.pages.first
        fd = os.open(source, os.O_RDONLY)
        try:
            tiles = (os.pread(fd, n, offset) for offset, n in zip(page.dataoffsets, page.databytecounts))
            tmp = path.with_suffix(".tmp")
            with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
                tw.write(tiles, shape=page.shape, dtype=np.uint8, photometric="rgb", compression="jpeg",
                         subsampling=page.subsampling, compressionargs={"outcolorspace": page.photometric.name},
                         tile=(page.tilelength, page.tilewidth), resolution=page.resolution,
                         resolutionunit=page.resolutionunit, metadata=None)
            os.replace(tmp, path)
        finally:
            os.close(fd)


def kept_tiles(path: Path, config: TileConfig) -> np.ndarray:
    """Level-0 top-left corners of the tiles `tile` keeps (the same selection it makes)."""
    with open_slide(path) as slide:
        grid = make_grid(slide, config.mpp, config.tile_px, config.stride)
        thumb, scale = slide.thumbnail(config.tissue.thumb_mpp)
        tissue = detect_tissue(thumb, slide.mpp * scale[0], config.tissue)
        return grid.l0_xy[tissue_fractions(grid, tissue, scale) >= config.min_tissue]


def _file_tiles(page: tifffile.TiffPage, l0_xy: np.ndarray) -> list[int]:
    """Indices of the level-0 file tiles under the kept tiles, in file order."""
    tile_w, tile_h = page.tilewidth, page.tilelength
    across = -(-page.imagewidth // tile_w)
    indices = set()
    for x, y in l0_xy:
        for ty in range(y // tile_h, (y + TILE_PX - 1) // tile_h + 1):
            for tx in range(x // tile_w, (x + TILE_PX - 1) // tile_w + 1):
                indices.add(ty * across + tx)
    return sorted(indices)


def raw_decode(path: Path, l0_xy: np.ndarray, threads: int = 1, from_memory: bool = True) -> tuple[float, int]:
    """Decode every level-0 file tile under the kept tiles once with imagecodecs.jpeg8_decode.

    ``from_memory``: all bytes are read before the clock starts; else each tile is read
    (pread) just before it is decoded.
    """
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        order = _file_tiles(page, l0_xy)
        offsets, counts, tables = page.dataoffsets, page.databytecounts, page.jpegtables
        fd = os.open(path, os.O_RDONLY)
        try:
            first = os.pread(fd, counts[order[0]], offsets[order[0]])
            assert np.array_equal(imagecodecs.jpeg8_decode(first, tables=tables).reshape(-1),
                                  page.decode(first, order[0], jpegtables=tables)[0].reshape(-1)), "not the reader's pixels"
            blobs = [os.pread(fd, counts[i], offsets[i]) for i in order] if from_memory else None

            def decode(part: int) -> None:
                for k in range(part, len(order), threads):
                    index = order[k]
                    data = blobs[k] if blobs is not None else os.pread(fd, counts[index], offsets[index])
                    imagecodecs.jpeg8_decode(data, tables=tables)

            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:  # imagecodecs releases the GIL
                list(pool.map(decode, range(threads)))
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
    return seconds, len(order) * page.tilewidth * page.tilelength


def openslide_read(path: Path, l0_xy: np.ndarray) -> tuple[float, int]:
    with openslide.OpenSlide(path) as osr:
        start = time.perf_counter()
        for x, y in l0_xy:
            np.asarray(osr.read_region((int(x), int(y)), 0, (TILE_PX, TILE_PX)))
        seconds = time.perf_counter() - start
    return seconds, len(l0_xy) * TILE_PX * TILE_PX


def tile_in_process(paths: list[Path], out: Path, stain: str, workers: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    results = run_tile(paths, out, TileConfig(stain=stain, tile_px=TILE_PX), workers=workers)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    return seconds, sum(r.n_patches for r in results) * TILE_PX * TILE_PX


def _command() -> list[str]:
    script = Path(sys.executable).with_name("gsd-wsi")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from gsd_wsi.cli.main import app; app()"]


def tile_command(path: Path, out: Path, stain: str, workers: int, n_tiles: int) -> tuple[float, int]:
    """The whole `gsd-wsi tile` command as a user runs it: interpreter start-up to exit."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([*_command(), "-q", "tile", str(path), "-o", str(out), "--stain", stain, "--workers", str(workers)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    return seconds, n_tiles * TILE_PX * TILE_PX


def fixed_costs(path: Path, out: Path) -> dict[str, float]:
    """Seconds of the parts of a command that do not grow with the tiles kept."""
    costs: dict[str, float] = {}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gsd_wsi.cli.main, gsd_wsi.cli.progress, gsd_wsi.stages.tile_batch"], check=True)
    costs["interpreter and imports"] = time.perf_counter() - start
    config = TileConfig(tile_px=TILE_PX)
    with open_slide(path) as slide:
        start = time.perf_counter()
        thumb, scale = slide.thumbnail(config.tissue.thumb_mpp)
        costs["thumbnail"] = time.perf_counter() - start
        start = time.perf_counter()
        detect_tissue(thumb, slide.mpp * scale[0], config.tissue)
        costs["tissue detection"] = time.perf_counter() - start
    item = collect_inputs([path], None)[0]
    for stain in ("none", "macenko"):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        plan = plan_slide(item, out, TileConfig(stain=stain, tile_px=TILE_PX), None)
        costs[f"planning, stain {stain} (open, thumbnail, tissue, QC picture, fit, empty store)"] = time.perf_counter() - start
        assert isinstance(plan, SlidePlan), plan
        abandon_slide(plan)
        if stain != "none":
            normalizer = StainNormalizer.from_params(plan.stain_params)
            start = time.perf_counter()
            normalizer.lut()
            costs[f"colour table, {stain}"] = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return costs


def page_cache_write_ms_per_mb(folder: Path, total_mb: int = 256) -> float:
    """Kernel CPU per MB to write new files. On a freshly booted VM the first touch of each
    guest page costs the hypervisor a fault (~2.5 ms/MB here, against ~0.3 once touched), and
    patch stores are written at ~0.2 GB per 100 Mpx: say which case a run measured."""
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(4 << 20)
    before = os.times()
    for i in range(total_mb // 4):
        with open(folder / f"w{i}", "wb") as fh:
            fh.write(block)
    after = os.times()
    shutil.rmtree(folder)
    return 1e3 * (after.system - before.system) / total_mb


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


def _workers(n: int) -> str:
    return f"{n} worker{'s' * (n > 1)}"


def measure(cases: dict[str, Callable[[], tuple[float, int]]], repeats: int, max_wait_s: float) -> dict[str, dict[str, float]]:
    """Best of ``repeats`` for each case, the cases interleaved so that load changes hit all
    alike, each started once the machine is idle (or ``max_wait_s`` has passed)."""
    runs: dict[str, list[tuple[float, int, float, float]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            if max_wait_s > 0:
                wait_for_idle(max_wait_s)
            load = os.getloadavg()[0]
            cpu_before = cpu_seconds()
            seconds, pixels = case()
            runs[name].append((seconds, pixels, cpu_seconds() - cpu_before, load))
    figures = {}
    for name, case_runs in runs.items():
        seconds, pixels, cpu, load = min(case_runs)
        figures[name] = {"seconds": seconds, "mpx_s": pixels / seconds / 1e6, "cpu_ms_per_mpx": 1e3 * cpu / (pixels / 1e6),
                         "load_1min": load}
    reference = next(iter(figures.values()))["mpx_s"]
    with_reads = next((f["mpx_s"] for name, f in figures.items() if name.startswith("(a')")), float("nan"))
    for figure in figures.values():
        figure["ratio"] = figure["mpx_s"] / reference
        figure["ratio_to_a_prime"] = figure["mpx_s"] / with_reads
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--slides", default=",".join(SLIDES), help=f"comma-separated, of {', '.join(SLIDES)}")
    parser.add_argument("--svs-size-px", type=int, default=40_000)
    parser.add_argument("--tiff-size-px", type=int, default=32_000)
    parser.add_argument("--repeats", type=int, default=1, help="best of N for each measurement")
    parser.add_argument("--cohort-slides", type=int, default=8, help="slides of (svs size/4)^2 px in case (e); 0: skip")
    parser.add_argument("--wait-idle-s", type=float, default=120.0,
                        help="before each case, wait up to this long for other work to leave the machine idle")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [s for s in args.slides.split(",") if s]
    unknown = set(names) - set(SLIDES)
    if unknown:
        parser.error(f"unknown slide(s) {sorted(unknown)}; choose from {', '.join(SLIDES)}")

    write_cost = page_cache_write_ms_per_mb(args.out / "write-probe")
    machine = (f"{cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start; "
               f"page-cache writes {write_cost:.2f} ms of kernel CPU per MB")
    print(machine, flush=True)
    report: dict = {"machine": machine, "page_cache_write_ms_per_mb": write_cost, "slides": {}}
    lines = [f"Machine: {machine}", ""]
    for name in names:
        file_name, spec = slide_spec(name, args)
        path = args.out / file_name
        flat = name.endswith("-flat")
        source = args.out / slide_spec(name.removesuffix("-flat"), args)[0] if flat else path
        if not source.exists():
            start = time.perf_counter()
            write_synthetic_slide(source, spec)
            print(f"wrote {source} in {time.perf_counter() - start:.0f} s", flush=True)
        if flat and not path.exists():
            write_without_pyramid(source, path)
        l0_xy = kept_tiles(path, TileConfig(tile_px=TILE_PX))
        n = len(l0_xy)
        title = (f"{name}: {file_name}, {spec.width_px} px square, JPEG q{spec.jpeg_quality} {spec.jpeg_colour.upper()} "
                 f"in {spec.file_tile_px}-px tiles, {'no pyramid' if flat else 'pyramid'}, {n} tiles kept "
                 f"({n * TILE_PX**2 / 1e6:.0f} Mpx)")
        print(title, flush=True)
        work = args.out / "work"
        cases: dict[str, Callable[[], tuple[float, int]]] = {
            "(a) raw decode, bytes in memory, 1 thread": partial(raw_decode, path, l0_xy),
            "(a') raw decode, pread + decode, 1 thread": partial(raw_decode, path, l0_xy, from_memory=False),
            "(a2) raw decode, bytes in memory, 2 threads": partial(raw_decode, path, l0_xy, threads=2),
            "(b) OpenSlide read_region, 1 thread": partial(openslide_read, path, l0_xy),
        }
        for stain, letter, label in (("none", "c", "no stain"), ("macenko", "d", "Macenko")):
            for workers in (1, 2):
                cases[f"({letter}) run_tile, {label}, {_workers(workers)}"] = partial(tile_in_process, [path], work, stain, workers)
        for stain in ("none", "macenko"):
            for workers in (1, 2):
                cases[f"(f) command `gsd-wsi tile --stain {stain}`, {_workers(workers)}"] = partial(
                    tile_command, path, work, stain, workers, n)
        if flat:  # its cost is the thumbnail: the cases that read one are enough
            keep = ("(a) ", "(a') ", "(c) run_tile, no stain, 1 worker", "(f) command `gsd-wsi tile --stain none`, 1 worker",
                    "(f) command `gsd-wsi tile --stain macenko`, 1 worker")
            cases = {case: run for case, run in cases.items() if case.startswith(keep)}
        if name == "svs" and args.cohort_slides:
            cohort_paths = cohort(args.out / "cohort", args.cohort_slides, args.svs_size_px // 4)
            for workers in (1, 2):
                cases[f"(e) cohort of {len(cohort_paths)} slides, Macenko, {_workers(workers)}"] = partial(
                    tile_in_process, cohort_paths, work, "macenko", workers)
        figures = measure(cases, args.repeats, args.wait_idle_s)
        costs = fixed_costs(path, work)
        for case, f in figures.items():
            print(f"  {case:55s} {f['seconds']:7.2f} s {f['mpx_s']:7.1f} Mpx/s {f['ratio']:5.2f}x "
                  f"{f['cpu_ms_per_mpx']:5.1f} CPU-ms/Mpx  load {f['load_1min']:.2f}", flush=True)
        for part, seconds in costs.items():
            print(f"  fixed: {part:70s} {seconds:5.2f} s", flush=True)
        report["slides"][name] = {"file": file_name, "spec": dataclasses.asdict(spec), "n_tiles": n,
                                  "cases": figures, "fixed_costs_s": costs}
        lines += [
            title, "",
            "| case | Mpx/s | ratio to (a) | ratio to (a') | CPU-ms per Mpx |",
            "|---|---:|---:|---:|---:|",
            *[f"| {case} | {f['mpx_s']:.1f} | {f['ratio']:.2f} | {f['ratio_to_a_prime']:.2f} | {f['cpu_ms_per_mpx']:.1f} |"
              for case, f in figures.items()],
            "",
            "| fixed cost | s |",
            "|---|---:|",
            *[f"| {part} | {seconds:.2f} |" for part, seconds in costs.items()],
            "",
        ]
    shutil.rmtree(args.out / "work", ignore_errors=True)
    report["load_1min_at_end"] = os.getloadavg()[0]
    print("\n".join(lines))
    (args.out / "bench_tile.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
