"""`gsd-wsi cohort` on a real dask LocalCluster: mixed cohorts, killed workers, resume after
SIGKILL, concurrent runs, refusals before any work, and the report in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gsd_wsi.errors import ConfigError, OutputError, SchedulerError
from gsd_wsi.stages.claim import LOCK_NAME, read_status
from gsd_wsi.stages.cohort import CohortConfig, dask_client, run_cohort
from gsd_wsi.stages.segment_config import SegmentConfig
from gsd_wsi.stages.tile_config import TileConfig
from gsd_wsi.synthetic import SyntheticSlideSpec, write_fluorescence_slide, write_synthetic_slide
from test_segment import save_tiny_model

GSD_WSI = [sys.executable, "-m", "gsd_wsi"]
# Small and fast: 2 um/px patches and 64-px windows over 2048-px synthetic slides.
TILE = TileConfig(mpp=2.0, tile_px=64, stain="none")
SEGMENT = SegmentConfig(batch_size=16, workers=1)
CLI_SETTINGS = ["--tile-mpp", "2", "--tile-px", "64", "--stain", "none", "--batch-size", "16"]


def _config(**changes) -> CohortConfig:
    return CohortConfig(**({"workers": 2, "tile": TILE, "segment": SEGMENT} | changes))


@pytest.fixture(scope="module")
def good_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSlideSpec(width_px=2048, height_px=2048, mpp=0.5, fmt="svs", n_tissue_regions=2, seed=3)
    return write_synthetic_slide(tmp_path_factory.mktemp("cohort-slide") / "good.svs", spec).path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cohort-model"), mpp=2.0)


def _copies(slide: Path, folder: Path, n: int, prefix: str = "s") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{i}.svs" for i in range(n)]
    for p in paths:
        shutil.copyfile(slide, p)
    return paths


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(columns)] + [",".join(r.get(c, "") for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _statuses(result) -> dict[str, str]:
    return {s.slide.slide_id: s.status for s in result.slides}


def test_mixed_cohort_records_each_failure_and_renders(good_slide: Path, model: Path, slides_dir: Path,
                                                       tmp_path: Path, chromium_page) -> None:
    inputs = tmp_path / "in"
    good = _copies(good_slide, inputs, 2, "good")
    no_mpp = inputs / "no-mpp.tif"
    tifffile.imwrite(no_mpp, np.full((512, 512, 3), 230, np.uint8), tile=(256, 256))
    dapi = write_fluorescence_slide(inputs / "dapi.tiff", 1024, 1024)
    manifest = _manifest(tmp_path / "cohort.csv", [{"path": str(p)} for p in
                                                   [*good, slides_dir / "broken.svs", no_mpp, dapi]])
    out = tmp_path / "out"

    result = run_cohort([manifest], out, model, _config())

    assert _statuses(result) == {"good0": "done", "good1": "done", "broken": "failed", "no-mpp": "failed",
                                 "dapi": "failed"}
    errors = {s.slide.slide_id: s.records["tile"].error for s in result.slides}
    assert "corrupt" in errors["broken"] and "--slide-mpp" in errors["no-mpp"] and "brightfield" in errors["dapi"]
    for sid in ("broken", "no-mpp", "dapi"):  # a slide's own errors are not retried
        assert read_status(out / sid)["stages"]["tile"]["attempts"] == 1
        assert result.slides[[s.slide.slide_id for s in result.slides].index(sid)].records["segment"].error_kind == "not run"
    for sid in ("good0", "good1"):
        state = read_status(out / sid)["stages"]
        assert state["tile"]["status"] == state["segment"]["status"] == "done"
        assert state["segment"]["attempts"] == 1 and state["segment"]["outputs"]["mask.ome.zarr"] > 0
        assert (out / sid / "segment" / "overlay.png").is_file() and (out / sid / "tile" / "patches.zarr").is_dir()
        assert not (out / sid / LOCK_NAME).exists()
    rows = (out / "cohort_summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * 2  # a row per slide and stage

    chromium_page.open(out / "report.html")
    page = chromium_page.page
    assert page.locator("tr.slide").count() == 5
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) >= 2 and all(w > 0 for w in widths)
    assert chromium_page.errors == [] and chromium_page.external_requests == []
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

    again = run_cohort([manifest], out, model, _config(report=False))
    assert {sid: s.records["segment"].status for sid, s in
            ((s.slide.slide_id, s) for s in again.slides) if sid.startswith("good")} == {"good0": "skipped",
                                                                                          "good1": "skipped"}
    assert read_status(out / "good0")["stages"]["segment"]["updated"] == \
        read_status(out / "good0")["stages"]["segment"]["updated"]


def test_a_killed_worker_is_retried_or_recorded(good_slide: Path, tmp_path: Path) -> None:
    """SIGKILL the worker holding slide s0 once (rescheduled: done on the second try) and the
    worker holding s1 every time (KilledWorker after the retries: recorded, the run goes on)."""
    paths = _copies(good_slide, tmp_path / "in", 4)
    out = tmp_path / "out"
    kills: dict[str, list[int]] = {"s0": [], "s1": []}
    stop = threading.Event()

    def assassin() -> None:
        while not stop.is_set():
            for sid, pids in kills.items():
                try:
                    pid = json.loads((out / sid / LOCK_NAME).read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    continue
                # kill an attempt once it is on record ("running"), not between its claim and its record
                if read_status(out / sid)["stages"].get("tile", {}).get("status") != "running":
                    continue
                if pid != os.getpid() and pid not in pids and (sid == "s1" or not pids):
                    pids.append(pid)
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    killer = threading.Thread(target=assassin, daemon=True)
    killer.start()
    try:
        result = run_cohort(paths, out, None, _config(stages=("tile",), retries=1, report=False))
    finally:
        stop.set()
        killer.join()
    statuses = _statuses(result)
    assert kills["s0"] and len(kills["s1"]) == 2
    # a slide finished by a worker killed before it reported is found finished on the retry
    assert statuses["s0"] == "done" and statuses["s1"] == "failed"
    assert {statuses["s2"], statuses["s3"]} <= {"done", "skipped"}
    assert read_status(out / "s0")["stages"]["tile"]["attempts"] == 2
    s1 = result.slides[1].records["tile"]
    assert s1.error_kind == "KilledWorker" and "died" in s1.error
    assert read_status(out / "s1")["stages"]["tile"]["status"] == "failed"


def test_resume_after_sigkill_of_the_whole_run(good_slide: Path, model: Path, tmp_path: Path) -> None:
    paths = _copies(good_slide, tmp_path / "in", 6)
    out = tmp_path / "out"
    command = [*GSD_WSI, "cohort", str(tmp_path / "in"), "-o", str(out), "--model", str(model), "--workers", "1",
               "--no-report", *CLI_SETTINGS]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            done = [p.stem for p in paths if read_status(out / p.stem)["stages"].get("segment", {}).get("status") == "done"]
            if len(done) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed; make the slides larger"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1.0)  # the worker process notices its parent's death and exits
    before = {sid: read_status(out / sid)["stages"] for sid in done}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for p in paths:
        state = read_status(out / p.stem)["stages"]
        assert state["tile"]["status"] == state["segment"]["status"] == "done", p.stem
        assert not (out / p.stem / LOCK_NAME).exists()
        assert not [q for q in (out / p.stem).iterdir() if q.name.startswith(".tmp")]
    for sid, stages in before.items():  # finished before the kill: not redone
        assert read_status(out / sid)["stages"]["segment"]["updated"] == stages["segment"]["updated"]
    assert "skipped" in rerun.stderr


def test_threads_of_one_worker_tile_slides_side_by_side(good_slide: Path, tmp_path: Path) -> None:
    paths = _copies(good_slide, tmp_path / "in", 4)
    result = run_cohort(paths, tmp_path / "out", None, _config(stages=("tile",), workers=1, threads_per_worker=2,
                                                               report=False))
    assert set(_statuses(result).values()) == {"done"}
    n_patches = {s.records["tile"].details["n_patches"] for s in result.slides}
    assert len(n_patches) == 1 and n_patches.pop() > 0  # copies of one slide: the same patches


def test_a_slide_over_its_time_limit_fails_alone(good_slide: Path, model: Path, tmp_path: Path) -> None:
    result = run_cohort([good_slide], tmp_path / "out", model, _config(workers=1, timeout_per_slide_s=0.01,
                                                                       report=False))
    record = result.slides[0].records["tile"]
    assert record.status == "failed" and record.error_kind == "SlideTimeoutError" and record.attempts == 1
    assert "--timeout-per-slide" in record.error
    assert not [p for p in (tmp_path / "out" / "good").iterdir() if p.name.startswith(".tmp")]


def test_transient_errors_are_raised_for_a_retry_and_counted(good_slide: Path, tmp_path: Path, monkeypatch) -> None:
    from gsd_wsi.manifest import SlideInput
    from gsd_wsi.stages import cohort_task

    calls = []

    def flaky(job):
        calls.append(job.slide.slide_id)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")  # an NFS hiccup
        (job.slide_dir / "tile").mkdir()
        return "done", {"n_patches": 3}

    monkeypatch.setitem(cohort_task._STAGE_RUNNERS, "tile", flaky)
    job = cohort_task.StageJob(SlideInput(good_slide, "good"), "tile", tmp_path, "h1", TILE, SEGMENT, None)
    with pytest.raises(cohort_task.TransientSlideError, match="Input/output error"):
        cohort_task.run_stage_task(job)
    assert read_status(tmp_path / "good")["stages"]["tile"]["status"] == "failed"
    record = cohort_task.run_stage_task(job)  # what dask's retry does
    assert record.status == "done" and record.attempts == 2 and not (tmp_path / "good" / LOCK_NAME).exists()
    assert cohort_task.run_stage_task(job).status == "skipped"
    assert not cohort_task.is_transient(ConfigError("bad")) and cohort_task.is_transient(TimeoutError())


def test_two_concurrent_runs_do_each_slide_once(good_slide: Path, tmp_path: Path) -> None:
    _copies(good_slide, tmp_path / "in", 6)
    out = tmp_path / "out"
    command = [*GSD_WSI, "cohort", str(tmp_path / "in"), "-o", str(out), "--stages", "tile", "--workers", "1",
               "--no-report", *CLI_SETTINGS]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [o[1][-2000:] for o in outputs]
    done = [int(re.search(r"done (\d+)", o[1]).group(1)) for o in outputs]
    assert sum(done) == 6, outputs  # every slide done exactly once between the two runs
    for i in range(6):
        assert read_status(out / f"s{i}")["stages"]["tile"]["attempts"] == 1


def test_problems_are_all_listed_before_any_work(good_slide: Path, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "bad.csv", [
        {"path": str(good_slide), "slide_id": "a"},
        {"path": str(good_slide), "slide_id": "a"},
        {"path": str(tmp_path / "missing.svs"), "slide_id": "b"},
        {"path": str(good_slide), "slide_id": "../escape"},
        {"path": str(good_slide), "slide_id": "/abs"},
        {"path": str(good_slide), "slide_id": "c", "mpp": "fast"},
        {"path": str(good_slide), "slide_id": "d", "min_object_um2": "-5"},
    ])
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        run_cohort([manifest], out, None, _config(stages=("tile",)))
    message = str(info.value)
    for needle in ("shared by", "missing.svs", "'../escape'", "'/abs'", "'fast'", "min_object_um2"):
        assert needle in message, needle
    assert "7 problem(s)" in message
    assert list(out.iterdir()) == [] and not (tmp_path / "escape").exists()  # no summary, no report

    no_path = tmp_path / "nopath.csv"
    no_path.write_text("file,slide_id\nx.svs,x\n")
    with pytest.raises(ConfigError, match="'path' column"):
        run_cohort([no_path], out, None, _config(stages=("tile",)))


def test_refusals_before_any_work(good_slide: Path, model: Path, pretrained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="not a fine-tuned segmentation model"):
        run_cohort([good_slide], out, pretrained_run, _config())
    not_a_model = tmp_path / "pretrain-run"
    not_a_model.mkdir()
    with pytest.raises(ConfigError, match="model.json"):
        run_cohort([good_slide], out, not_a_model, _config())
    with pytest.raises(ConfigError, match="--stages"):
        _config(stages=("tile", "classify"))

    run_cohort([good_slide], out, None, _config(stages=("tile",), workers=1, report=False))
    other = _config(stages=("tile",), workers=1, tile=TileConfig(mpp=2.0, tile_px=32, stain="none"))
    with pytest.raises(OutputError, match="other settings"):
        run_cohort([good_slide], out, None, other)
    redone = run_cohort([good_slide], out, None, CohortConfig(**(other.__dict__ | {"overwrite": True, "report": False})))
    assert _statuses(redone) == {"good": "done"}


def test_an_unreachable_scheduler_fails_fast(good_slide: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(SchedulerError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9"):
        run_cohort([good_slide], tmp_path / "out", None,
                   _config(stages=("tile",), scheduler="tcp://127.0.0.1:9", connect_timeout_s=2.0))
    assert time.monotonic() - started < 60  # seconds, not a hang


def _start_a_process() -> int:
    import multiprocessing as mp

    child = mp.get_context("spawn").Process(target=os.getpid)
    child.start()
    child.join()
    return child.exitcode


def test_worker_processes_may_start_processes(tmp_path: Path) -> None:
    with dask_client(_config(workers=1)) as client:
        assert client.submit(_start_a_process, pure=False).result(timeout=120) == 0
