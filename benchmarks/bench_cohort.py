"""`gsd-wsi cohort` on a cohort of synthetic slides: 1 against 2 worker processes, the cluster's
start-up apart, and the fixed cost of a slide step by step, in one run.

    python benchmarks/bench_cohort.py --out bench-out/cohort [--repeats 2] [--parts startup,cohort,fixed]

Slides and the model are made once under --out and reused:
  cohort  8 Aperio SVS of 8192 x 6144 px at 0.5 um/px (levels 1, 4, 16; 3 tissue regions);
  small   one SVS of 2048 x 2048 px (1 x 1 mm, 2 tissue regions), for the fixed costs;
  model   the `tiny` U-Net fine-tuned for a few epochs on gland crops of another synthetic
          slide, at 1.0 um/px with 128-px windows and Macenko normalisation (its masks are
          glands, not the speckle of random weights, whose GeoJSON would dominate).
Stages tile (0.5 um/px, 256 px, Macenko: the defaults) and segment (batch 16, 2 reader
threads, CPU).

(a) Start-up, per number of workers: the LocalCluster and its Client, then in every worker
    what its first segment task pays once (imports, the model, torch's first forward pass),
    the network alone on 8 batches (all workers at once), and the cluster's shutdown.
(b) Cohort: run_cohort over the cohort with 1 and with 2 workers, a fresh output folder
    each time, repeats interleaved (1, 2, 1, 2, ...), each started on an idle machine. Wall
    time (cluster start-up and the report included), and the time from the cluster being up
    to the last slide done; slides/hour of each; the speed-up of 2 workers over 1. Once, for
    reference, 1 worker held to one core (CPU affinity, which the workers inherit).
(c) Fixed cost: the small slide through tile and segment in this process (run_stage_task,
    as a worker runs them, after a warm-up slide so that imports and the model are loaded),
    each step timed by wrapping the functions the stages call (exclusive times: a step
    nested in another is counted once, in itself); and the client's per-slide part (its
    rows of cohort_summary.csv and report.html, the report thumbnail).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from machine import cpu_model, wait_for_idle  # benchmarks/machine.py

MODEL_MPP = 1.0
PATCH_PX = 128
COHORT_SLIDE = (8192, 6144)
SMALL_SLIDE = (2048, 2048)
NETWORK_BATCHES = 8  # batches of 16 windows timed in each worker at start-up (the network alone)


# -- inputs --------------------------------------------------------------------------------


def make_slides(folder: Path, n: int, size_px: tuple[int, int], n_regions: int, prefix: str) -> list[Path]:
    """``n`` synthetic SVS slides (made once, then reused)."""
    from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}-{size_px[0]}x{size_px[1]}-{i}.svs"
        if not path.exists():
            spec = SyntheticSlideSpec(width_px=size_px[0], height_px=size_px[1], mpp=0.5, n_tissue_regions=n_regions,
                                      seed=100 + i)
            write_synthetic_slide(path, spec)
        paths.append(path)
    return paths


def make_model(out: Path) -> Path:
    """The tiny U-Net fine-tuned briefly on gland crops at 1.0 um/px, Macenko (cached)."""
    model = out / "model-glands"
    if (model / "model" / "model.json").exists():
        return model
    from gsd_wsi.stages.finetune import FinetuneConfig, run_finetune
    from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide
    from gsd_wsi.synthetic_labels import write_labelled_crops

    started = time.perf_counter()
    slide = write_synthetic_slide(out / "train.svs", SyntheticSlideSpec(width_px=8192, height_px=8192, mpp=0.5,
                                                                       n_tissue_regions=4, seed=21))
    write_labelled_crops(slide, out / "glands-data", mpp=MODEL_MPP, crop_px=256, n_crops=24)
    config = FinetuneConfig(classes=2, class_names=("background", "gland"), model="tiny", init="pytorch", epochs=12,
                            batch_size=16, patch_px=PATCH_PX, crops_per_image=4, loss="dice+ce", lr=1e-3,
                            mpp=MODEL_MPP, stain="macenko", val_every=4, device="cpu")
    run_finetune(out / "glands-data", model, config, None, overwrite=True)
    print(f"fine-tuned the model in {time.perf_counter() - started:.0f} s", flush=True)
    return model


def stage_configs() -> tuple[Any, Any]:
    from gsd_wsi.stages.segment_config import SegmentConfig
    from gsd_wsi.stages.tile_config import TileConfig

    return TileConfig(), SegmentConfig(batch_size=16, workers=2, device="cpu")


# -- (a) start-up --------------------------------------------------------------------------


def _warm_worker(model_dir: str, torch_threads: int) -> dict[str, float]:
    """In a worker: what its first segment task pays once, step by step."""
    t0 = time.perf_counter()
    import torch  # noqa: F401

    import gsd_wsi.stages.segment
    import gsd_wsi.stages.tile  # noqa: F401
    from gsd_wsi.stages import cohort_task

    t1 = time.perf_counter()
    cohort_task._set_torch_threads(torch_threads)
    model = cohort_task._model(Path(model_dir), "cpu")
    t2 = time.perf_counter()
    windows = np.full((16, model.patch_px, model.patch_px, 3), 200, np.uint8)
    model.predict(windows)
    t3 = time.perf_counter()
    for _ in range(NETWORK_BATCHES):
        model.predict(windows)
    t4 = time.perf_counter()
    return {"imports_s": t1 - t0, "model_s": t2 - t1, "first_forward_s": t3 - t2,
            "windows_per_s": NETWORK_BATCHES * len(windows) / (t4 - t3)}


def startup(workers: int, model: Path) -> dict[str, Any]:
    from gsd_wsi.stages.cohort import CohortConfig, dask_client

    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    with dask_client(CohortConfig(workers=workers)) as client:
        client.wait_for_workers(workers)
        t1 = time.perf_counter()
        per_worker = client.run(_warm_worker, str(model.resolve()), max(1, cores // workers))
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    steps = {k: max(w[k] for w in per_worker.values()) for k in next(iter(per_worker.values()))}
    return {"workers": workers, "cluster_s": t1 - t0, "warm_wall_s": t2 - t1, "close_s": t3 - t2,
            "slowest_worker": steps, "per_worker": list(per_worker.values()),
            "network_windows_per_s_all_workers": sum(w["windows_per_s"] for w in per_worker.values())}


# -- (b) the cohort ------------------------------------------------------------------------


class _Clock:
    """Cohort progress that notes when the cluster was up and when each slide finished."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.slides_done: list[float] = []

    def start(self, n_slides: int, dashboard: str | None) -> None:
        self.started = time.perf_counter()

    def stage_done(self, record: Any) -> None:
        pass

    def slide_done(self, outcome: Any) -> None:
        self.slides_done.append(time.perf_counter())

    def finish(self) -> None:
        pass


def cohort_run(paths: list[Path], out: Path, model: Path, workers: int, cores: int | None = None) -> dict[str, Any]:
    """run_cohort over ``paths`` with ``workers`` local workers, on the first ``cores`` cores
    only when given (the workers inherit this process's CPU affinity)."""
    from gsd_wsi.stages.cohort import CohortConfig, run_cohort

    tile, segment = stage_configs()
    shutil.rmtree(out, ignore_errors=True)
    clock = _Clock()
    allowed = os.sched_getaffinity(0)
    if cores is not None:
        os.sched_setaffinity(0, sorted(allowed)[:cores])
    try:
        t0 = time.perf_counter()
        result = run_cohort(paths, out, model, CohortConfig(workers=workers, stages=("tile", "segment"), tile=tile,
                                                            segment=segment, report=True), progress=clock)
        wall = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, allowed)
    bad = [(s.slide.slide_id, s.status) for s in result.slides if s.status != "done"]
    assert not bad, bad
    assert clock.started is not None and len(clock.slides_done) == len(paths)
    processing = max(clock.slides_done) - clock.started
    stage_s = {stage: [s.records[stage].seconds for s in result.slides] for stage in ("tile", "segment")}
    summaries = [json.loads((out / s.slide.slide_id / "segment" / "summary.json").read_text()) for s in result.slides]
    return {
        "workers": workers, "cores": cores or len(allowed), "wall_s": wall, "run_cohort_wall_s": result.wall_s,
        "processing_s": processing,
        "until_cluster_up_s": clock.started - t0, "after_last_slide_s": t0 + wall - max(clock.slides_done),
        "slides_per_hour": result.slides_per_hour, "slides_per_hour_processing": len(paths) / processing * 3600,
        "stage_s": stage_s, "task_s_total": sum(map(sum, stage_s.values())),
        "network_s_total": sum(s["timing_s"]["network_s"] for s in summaries),
        "n_windows": sum(s["n_windows"] for s in summaries),
        "n_patches": sum(s.records["tile"].details.get("n_patches", 0) for s in result.slides),
        "load_1min": os.getloadavg()[0],
    }


# -- (c) fixed costs -----------------------------------------------------------------------


class StepTimer:
    """Exclusive seconds of wrapped functions, on the main thread only (helper threads call
    some of them too: those calls are left to the step that waits for them)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[Any]] = []
        self._main = threading.main_thread()

    def wrap(self, label: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not self._main:
                return func(*args, **kwargs)
            frame = [label, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return func(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = time.perf_counter() - frame[1]
                self.seconds[label] = self.seconds.get(label, 0.0) + elapsed - frame[2]
                self.calls[label] = self.calls.get(label, 0) + 1
                if self._stack:
                    self._stack[-1][2] += elapsed
        return timed

    @contextmanager
    def patched(self, targets: list[tuple[str, str, str]]) -> Iterator[None]:
        """Wrap ``module:attr`` (``attr`` may be ``Class.method``) under ``label`` for the block;
        targets that do not exist (another version of the code) are skipped."""
        undo = []
        for label, module_name, attr in targets:
            owner: Any = importlib.import_module(module_name)
            *path, name = attr.split(".")
            try:
                for part in path:
                    owner = getattr(owner, part)
                original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            except (AttributeError, KeyError):
                continue
            kind = type(original) if isinstance(original, (classmethod, staticmethod)) else None
            wrapped = kind(self.wrap(label, original.__func__)) if kind else self.wrap(label, original)
            setattr(owner, name, wrapped)
            undo.append((owner, name, original))
        try:
            yield
        finally:
            for owner, name, original in reversed(undo):
                setattr(owner, name, original)


_TASK = "gsd_wsi.stages.cohort_task"
_TILE = "gsd_wsi.stages.tile"
_SEG = "gsd_wsi.stages.segment"
#: (label, module, attribute): the steps of one slide in each stage, in the order they run.
STEPS = {
    "task": [
        ("claim and release (.lock)", "gsd_wsi.stages.claim", "_create_lock"),
        ("claim and release (.lock)", "gsd_wsi.stages.claim", "LockOwner.read"),
        ("remove stale temporaries", _TASK, "remove_stale_temporaries"),
        ("read status.json", _TASK, "read_status"),
        ("write status.json (running, done)", _TASK, "write_stage_status"),
        ("output sizes", _TASK, "_output_sizes"),
        ("model (cached per worker)", _TASK, "_model"),
    ],
    "tile": [
        ("open slide", _TILE, "open_slide"),
        ("settings hash, grid", _TILE, "settings_hash"),
        ("settings hash, grid", _TILE, "make_grid"),
        ("thumbnail", "gsd_wsi.slide.base", "Slide.thumbnail"),
        ("brightfield check", _TILE, "check_brightfield"),
        ("tissue detection", _TILE, "detect_tissue"),
        ("tissue fractions", _TILE, "tissue_fractions"),
        ("QC picture tissue.png: render", _TILE, "render_tissue_qc"),
        ("QC picture tissue.png: PNG encode, write", _TILE, "save_png"),
        ("QC picture tissue.png: rest (resize)", _TILE, "_write_qc"),
        ("stain fit: read sample tiles", _TILE, "read_tiles"),
        ("stain fit: fit", "gsd_wsi.stain.base", "StainNormalizer.fit_source"),
        ("colour table (2^24 LUT)", "gsd_wsi.stain.base", "build_lut"),
        ("create store", _TILE, "create_store"),
        ("fill shards (read, normalise, write)", _TILE, "fill_shards"),
        ("finish (rename)", _TILE, "finish_slide"),
    ],
    "segment": [
        ("open slide", _SEG, "open_slide"),
        ("settings hash, frame", _SEG, "segment_settings_hash"),
        ("settings hash, frame", _SEG, "mask_frame"),
        ("thumbnail", "gsd_wsi.slide.base", "Slide.thumbnail"),
        ("brightfield check", _SEG, "check_brightfield"),
        ("tissue detection", _SEG, "detect_tissue"),
        ("plan windows", _SEG, "plan_windows"),
        ("window reader (open)", _SEG, "WindowReader"),
        ("stain fit: read sample windows", "gsd_wsi.stages.segment_windows", "WindowReader.read"),
        ("stain fit: fit", "gsd_wsi.stain.base", "StainNormalizer.fit_source"),
        ("colour table (2^24 LUT)", "gsd_wsi.stain.base", "build_lut"),
        ("writer creation (zarr pyramid)", _SEG, "LabelPyramidWriter"),
        ("network (windows through the model)", "gsd_wsi.stages.segment_model", "SegmentationModel.predict"),
        ("stitch and band writes", "gsd_wsi.stitch", "BandStitcher.add_batch"),
        ("zarr pyramid levels (finish)", "gsd_wsi.masks.omezarr", "LabelPyramidWriter.finish"),
        ("window reader (close)", "gsd_wsi.stages.segment_windows", "WindowReader.close"),
        ("reading windows (waits) and the rest of inference", _SEG, "_infer"),
        ("mask.tiff", _SEG, "write_pyramidal_tiff"),
        ("mask.geojson", _SEG, "write_geojson"),
        ("overlay.png: render", _SEG, "render_overlay"),
        ("overlay.png: PNG encode, write", _SEG, "save_png"),
        ("overlay.png: rest (labels, thumbnail)", _SEG, "_write_overlay"),
        ("summary.json", _SEG, "atomic_write_text"),
        ("finish (rename)", _SEG, "replace_dir"),
    ],
}


def fixed_costs(small: Path, out: Path, model: Path, repeats: int) -> dict[str, Any]:
    """Exclusive seconds of each step of the small slide, best of ``repeats`` per step."""
    import torch

    from gsd_wsi.manifest import collect_inputs
    from gsd_wsi.stages import cohort, cohort_task

    tile, segment = stage_configs()
    torch_threads = os.cpu_count() or 1  # as a single worker's tasks get them
    item = dataclasses.replace(collect_inputs([small], None)[0], path=small.resolve())
    client_steps = [("cohort_summary.csv row", "gsd_wsi.stages.cohort", "write_summary"),
                    ("report.html: thumbnail (decode, resize, JPEG)", "gsd_wsi.report.html", "embed_thumbnails"),
                    ("report.html: the rest (rows, plots, write)", "gsd_wsi.stages.cohort", "write_cohort_report")]

    def one_slide(folder: Path, timed: bool) -> dict[str, Any]:
        shutil.rmtree(folder, ignore_errors=True)
        records, seconds, steps = {}, {}, {}
        for stage in ("tile", "segment"):
            job = cohort_task.StageJob(item, stage, folder.resolve(), "bench", tile, segment, model.resolve(),  # type: ignore[arg-type]
                                       torch_threads=torch_threads)
            timer = StepTimer()
            with timer.patched(STEPS["task"] + STEPS[stage] if timed else []):
                t0 = time.perf_counter()
                records[stage] = cohort_task.run_stage_task(job)
                seconds[stage] = time.perf_counter() - t0
            assert records[stage].status == "done", records[stage]
            steps[stage] = timer.seconds
        result = cohort.CohortResult(folder.resolve(), [cohort.SlideOutcome(item, records)], 0.0,
                                     folder / cohort.SUMMARY_NAME, None)
        timer = StepTimer()
        with timer.patched(client_steps if timed else []):
            t0 = time.perf_counter()
            cohort.write_summary(result)
            cohort.write_cohort_report(result, cohort.CohortConfig(workers=1, tile=tile, segment=segment), model)
            seconds["client"] = time.perf_counter() - t0
        steps["client"] = timer.seconds
        return {"seconds": seconds, "steps": steps, "n_patches": records["tile"].details["n_patches"]}

    torch.set_num_threads(torch_threads)
    t0 = time.perf_counter()
    first = one_slide(out / "warm-up", timed=False)  # imports, the model, torch's first forward pass
    first_s = time.perf_counter() - t0
    runs = [one_slide(out / "measured", timed=True) for _ in range(repeats)]
    summary = json.loads((out / "measured" / item.slide_id / "segment" / "summary.json").read_text())
    parts = ("tile", "segment", "client")
    return {
        "slide": str(small), "n_patches": first["n_patches"], "n_windows": summary["n_windows"],
        "first_slide_of_a_worker_s": first_s, "first_slide_seconds": first["seconds"],
        "seconds_best": {p: min(r["seconds"][p] for r in runs) for p in parts},
        "steps_best": {p: {label: min(r["steps"][p].get(label, 0.0) for r in runs) for label in runs[0]["steps"][p]}
                       for p in parts},
        "task_labels": list(dict.fromkeys(label for label, _, _ in STEPS["task"])),
        "runs": runs, "segment_timing_s_last": summary["timing_s"],
    }


# -- tables --------------------------------------------------------------------------------


def cohort_table(runs: list[dict[str, Any]], n_slides: int) -> tuple[list[str], dict[str, Any]]:
    cases = sorted({(r["workers"], r["cores"]) for r in runs}, key=lambda c: (-c[1], c[0]))
    best = {c: min((r for r in runs if (r["workers"], r["cores"]) == c), key=lambda r: r["wall_s"]) for c in cases}
    lines = [("| workers | cores | wall s (each run) | slides/h | cluster up s | cluster up -> last slide s | "
              "slides/h without start-up | task s per slide: tile / segment | network windows/s | tasks at once |"),
             "|---:|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for (workers, cores), r in best.items():
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in runs if (x["workers"], x["cores"]) == (workers, cores))
        per_tile = sum(r["stage_s"]["tile"]) / n_slides
        per_seg = sum(r["stage_s"]["segment"]) / n_slides
        network = r["n_windows"] * workers / r["network_s_total"]  # the workers' networks run side by side
        lines.append(f"| {workers} | {cores} | {walls} | {r['slides_per_hour']:.0f} | {r['until_cluster_up_s']:.1f} | "
                     f"{r['processing_s']:.1f} | {r['slides_per_hour_processing']:.0f} | {per_tile:.2f} / {per_seg:.2f} | "
                     f"{network:.1f} | {r['task_s_total'] / r['processing_s']:.2f} |")
    all_cores = max(c for _, c in cases)
    one, two = best.get((1, all_cores)), best.get((2, all_cores))
    speedup: dict[str, float] = {}
    if one and two:
        speedup = {"wall": one["wall_s"] / two["wall_s"], "without_start_up": one["processing_s"] / two["processing_s"]}
        lines += ["", (f"Speed-up of 2 workers over 1: **{speedup['wall']:.2f}x** wall, "
                       f"{speedup['without_start_up']:.2f}x from the cluster being up to the last slide.")]
    single = best.get((1, 1))
    if single and two and all_cores > 1:
        speedup["over_one_core"] = single["wall_s"] / two["wall_s"]
        lines.append(f"Against 1 worker held to one core: {speedup['over_one_core']:.2f}x.")
    return lines, speedup


def startup_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [("| workers | LocalCluster + Client s | worker imports s | model load s | first forward s | "
              "shutdown s | network alone, windows/s (all workers) |"),
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["slowest_worker"]
        lines.append(f"| {r['workers']} | {r['cluster_s']:.2f} | {s['imports_s']:.2f} | {s['model_s']:.2f} | "
                     f"{s['first_forward_s']:.2f} | {r['close_s']:.2f} | {r['network_windows_per_s_all_workers']:.1f} |")
    return lines


def fixed_table(fixed: dict[str, Any], min_s: float = 0.003) -> list[str]:
    """Steps of each stage (the task's own steps last), then the client's; steps under
    ``min_s`` are summed in one row."""
    lines = ["| stage | step | s | share of the stage |", "|---|---|---:|---:|"]
    task_labels = set(fixed["task_labels"])
    for part in ("tile", "segment", "client"):
        total = fixed["seconds_best"][part]
        steps = fixed["steps_best"][part]
        ordered = [k for k in steps if k not in task_labels] + [k for k in steps if k in task_labels]
        small = [k for k in ordered if steps[k] < min_s]
        for label in ordered:
            if label not in small:
                name = f"task: {label}" if label in task_labels else label
                lines.append(f"| {part} | {name} | {steps[label]:.3f} | {steps[label] / total:.0%} |")
        if small:
            rest = sum(steps[k] for k in small)
            lines.append(f"| {part} | {len(small)} other steps, each under {1e3 * min_s:.0f} ms | {rest:.3f} | "
                         f"{rest / total:.0%} |")
        lines.append(f"| {part} | **whole** | **{total:.3f}** | |")
    lines.append(f"| | first slide of a worker, tile + segment (imports, model, first forward) | "
                 f"{fixed['first_slide_of_a_worker_s']:.2f} | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/cohort"))
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each cohort run")
    parser.add_argument("--one-core-repeats", type=int, default=1,
                        help="runs of 1 worker held to one core (taskset), the per-core reference")
    parser.add_argument("--fixed-repeats", type=int, default=3)
    parser.add_argument("--parts", default="startup,cohort,fixed", help="which of startup, cohort, fixed to run")
    parser.add_argument("--model", type=Path, default=None, help="a model folder to use instead of the cached one")
    parser.add_argument("--json", default="bench_cohort.json", help="results file under --out")
    parser.add_argument("--wait-idle-s", type=float, default=60.0,
                        help="before each case, wait up to this long for other work to leave the machine idle")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    import gsd_wsi

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    model = args.model or make_model(out)
    cohort = make_slides(out / "slides", args.slides, COHORT_SLIDE, 3, "cohort")
    small = make_slides(out / "slides", 1, SMALL_SLIDE, 2, "small")[0]
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; "
               f"load average {os.getloadavg()[0]:.2f} at start")
    print(machine, f"(gsd_wsi from {Path(gsd_wsi.__file__).parent})", flush=True)
    result: dict[str, Any] = {"machine": machine, "code": str(Path(gsd_wsi.__file__).parent), "model": str(model),
                              "cohort": {"slides": len(cohort), "size_px": COHORT_SLIDE}, "small_size_px": SMALL_SLIDE}
    lines: list[str] = []

    if "startup" in parts:
        rows = []
        for workers in args.workers:
            wait_for_idle(args.wait_idle_s)
            rows.append(startup(workers, model))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_worker"}), flush=True)
        result["startup"] = rows
        lines += ["Start-up (slowest worker):", "", *startup_table(rows), ""]

    if "cohort" in parts:
        runs = []
        for repeat in range(args.repeats):
            cases = [(w, None) for w in args.workers] + [(1, 1)] * (repeat < args.one_core_repeats)
            for workers, cores in cases:  # interleaved: this VM's speed drifts
                idle = wait_for_idle(args.wait_idle_s)
                run = cohort_run(cohort, out / "cohort-out", model, workers, cores)
                runs.append(run | {"repeat": repeat, "idle_before": idle})
                print(json.dumps({k: v for k, v in run.items() if k != "stage_s"}), flush=True)
        shutil.rmtree(out / "cohort-out", ignore_errors=True)
        table, speedup = cohort_table(runs, len(cohort))
        result["cohort_runs"], result["speedup"] = runs, speedup
        lines += [(f"Cohort: {len(cohort)} slides of {COHORT_SLIDE[0]} x {COHORT_SLIDE[1]} px, tile + segment, "
                   f"{runs[0]['n_patches']} patches and {runs[0]['n_windows']} windows in all; best of {args.repeats}:"),
                  "", *table, ""]

    if "fixed" in parts:
        wait_for_idle(args.wait_idle_s)
        fixed = fixed_costs(small, out / "fixed-out", model, args.fixed_repeats)
        shutil.rmtree(out / "fixed-out", ignore_errors=True)
        result["fixed"] = fixed
        print(json.dumps({k: fixed[k] for k in ("seconds_best", "steps_best")}), flush=True)
        lines += [(f"Fixed cost, {SMALL_SLIDE[0]} x {SMALL_SLIDE[1]} px slide ({fixed['n_patches']} patches, "
                   f"{fixed['n_windows']} windows), best of {args.fixed_repeats}, exclusive seconds:"),
                  "", *fixed_table(fixed), ""]

    result["load_1min_at_end"] = os.getloadavg()[0]
    (out / args.json).write_text(json.dumps(result, indent=2, default=str))
    print("\n".join(lines))
    print(f"wrote {out / args.json}")


if __name__ == "__main__":
    main()
