"""`gsd-wsi tile` over many slides: processes, failure isolation, resume, summary CSV.

With ``workers > 1`` the unit of work is a shard of one slide, not a slide, so a single
large slide uses every worker as well as a cohort does. A few slides are planned ahead
while others are read; a failure marks its own slide failed and the run goes on.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import logging.handlers
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gsd_wsi.atomic import atomic_write_text, remove_stale_temporaries
from gsd_wsi.errors import GsdWsiError, OutputError
from gsd_wsi.manifest import SlideInput, collect_inputs
from gsd_wsi.progress import NullProgress, Progress
from gsd_wsi.slide.image_backend import read_plain_image
from gsd_wsi.stages.tile import (
    SlidePlan, SlideResult, abandon_slide, fill_shards, finish_slide, plan_slide, planned_read_xy,
)
from gsd_wsi.stages.tile_config import TileConfig

logger = logging.getLogger(__name__)

SUMMARY_NAME = "tile_summary.csv"
_SUMMARY_FIELDS = ("slide_id", "path", "status", "n_patches", "seconds", "error")
_LOCK_NAME = ".gsd-wsi-tile.lock"


def run_tile(
    sources: list[str | Path],
    out_dir: str | Path,
    config: TileConfig = TileConfig(),
    workers: int = 1,
    overwrite: bool = False,
    slide_mpp: float | None = None,
    progress: Progress | None = None,
) -> list[SlideResult]:
    """Tile every slide in ``sources`` into ``out_dir/<slide_id>/``; write the summary CSV.

    Returns one result per input, in input order. Problems with one slide are recorded in
    its result; only problems with the whole run (bad options, an unwritable output
    folder, another run holding it) raise.
    """
    if workers < 1:
        raise GsdWsiError(f"--workers must be at least 1 (got {workers})")
    out_dir = Path(out_dir)
    progress = progress or NullProgress()
    inputs = collect_inputs(list(sources), slide_mpp)
    target_rgb = read_plain_image(config.stain_target)[0] if config.stain_target is not None else None
    with _exclusive(out_dir):
        removed = remove_stale_temporaries(out_dir)
        if removed:
            logger.info("removed %d unfinished output(s) of an interrupted run", removed)
        results: dict[int, SlideResult] = {}
        for i, item in enumerate(inputs):
            if item.error is not None:
                results[i] = SlideResult(item.slide_id, item.path, "failed", error=item.error)
        todo = [(i, item) for i, item in enumerate(inputs) if i not in results]
        progress.start(n_slides=len(inputs))
        for i in results:
            progress.slide_done(results[i])

        def record(index: int, result: SlideResult) -> None:
            results[index] = result
            _log_result(result)
            progress.slide_done(result)
            _write_summary(out_dir, [results[k] for k in sorted(results)])

        run = _Run(out_dir, config, target_rgb, overwrite, progress, record)
        if workers == 1:
            _run_serial(todo, run)
        else:
            _run_parallel(todo, run, workers)
        _write_summary(out_dir, [results[k] for k in sorted(results)])
        progress.finish()
    return [results[k] for k in sorted(results)]


def _failed(item: SlideInput, exc: BaseException) -> SlideResult:
    message = str(exc) if isinstance(exc, GsdWsiError) else f"{type(exc).__name__}: {exc}"
    return SlideResult(item.slide_id, item.path, "failed", error=message.replace("\n", " "))


@dataclass(frozen=True)
class _Run:
    """What every slide of one run shares."""

    out_dir: Path
    config: TileConfig
    target_rgb: np.ndarray | None
    overwrite: bool
    progress: Progress
    record: Callable[[int, SlideResult], None]

    def plan_args(self, item: SlideInput) -> tuple:
        return item, self.out_dir, self.config, self.target_rgb, self.overwrite


def _run_serial(todo: list[tuple[int, SlideInput]], run: _Run) -> None:
    for index, item in todo:
        plan: SlidePlan | None = None
        try:
            planned = plan_slide(*run.plan_args(item))
            if isinstance(planned, SlideResult):
                run.record(index, planned)
                continue
            plan = planned
            run.progress.slide_started(item.slide_id, plan.n_patches)
            fill_shards(plan, list(range(len(plan.shards))), planned_read_xy(plan), on_shard=run.progress.tiles_done)
            run.record(index, finish_slide(plan))
        except Exception as exc:  # one slide's failure never stops the others
            if plan is not None:
                abandon_slide(plan)
            run.record(index, _failed(item, exc))


def _worker_pool(workers: int) -> tuple[ProcessPoolExecutor, logging.handlers.QueueListener]:
    """Worker processes that log through the parent's handlers.

    forkserver, not fork: the parent may run threads (zarr's I/O loop, a progress bar) whose
    locks a forked child would inherit held. The server imports the stage once, so each
    worker starts in milliseconds instead of re-importing everything as spawn does.
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["gsd_wsi.stages.tile"])
    log_queue = context.Queue()
    listener = logging.handlers.QueueListener(log_queue, *logging.getLogger().handlers, respect_handler_level=True)
    level = logging.getLogger("gsd_wsi").getEffectiveLevel()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(log_queue, level))
    return pool, listener


def _init_worker(log_queue: mp.Queue, level: int) -> None:
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(logging.WARNING)
    logging.getLogger("gsd_wsi").setLevel(level)


def _run_parallel(todo: list[tuple[int, SlideInput]], run: _Run, workers: int) -> None:
    pool, listener = _worker_pool(workers)
    listener.start()
    try:
        with pool:
            _Scheduler(pool, workers, run).run(todo)
    finally:
        listener.stop()


@dataclass
class _OpenSlide:
    """A planned slide whose shard groups are being filled."""

    plan: SlidePlan
    jobs_left: int
    jobs: list[Future] = field(default_factory=list)
    failed: bool = False


class _Scheduler:
    """Plans a few slides ahead, fills each planned slide's shard groups in any worker, and
    finishes a slide when its last group is written. Results go to ``record`` as they come."""

    def __init__(self, pool: ProcessPoolExecutor, workers: int, run: _Run) -> None:
        self.pool, self.workers = pool, workers
        self.progress, self.record, self.plan_args = run.progress, run.record, run.plan_args
        self.planning: dict[Future, tuple[int, SlideInput]] = {}
        self.filling: dict[Future, int] = {}      # fill job -> input index
        self.open: dict[int, _OpenSlide] = {}     # input index -> slide being filled

    def run(self, todo: list[tuple[int, SlideInput]]) -> None:
        pending = deque(todo)
        lookahead = self.workers + 1
        while pending or self.planning or self.filling:
            while pending and len(self.planning) + len(self.open) < lookahead:
                index, item = pending.popleft()
                self.planning[self.pool.submit(plan_slide, *self.plan_args(item))] = (index, item)
            done, _ = wait(set(self.planning) | set(self.filling), return_when=FIRST_COMPLETED)
            for future in done:
                if future in self.planning:
                    self._planned(future, *self.planning.pop(future))
                else:
                    self._filled(future, self.filling.pop(future))

    def _planned(self, future: Future, index: int, item: SlideInput) -> None:
        try:
            planned = future.result()
        except Exception as exc:
            self.record(index, _failed(item, exc))
            return
        if isinstance(planned, SlideResult):
            self.record(index, planned)
            return
        self.progress.slide_started(item.slide_id, planned.n_patches)
        shards = planned.shards
        if not shards:
            self._finish(index, planned)
            return
        read_xy = planned_read_xy(planned)
        groups = _shard_groups(len(shards), self.workers)
        slide = self.open[index] = _OpenSlide(planned, len(groups))
        for group in groups:
            start, stop = shards[group[0]][0], shards[group[-1]][1]
            job = self.pool.submit(fill_shards, planned, group, read_xy[start:stop])
            self.filling[job] = index
            slide.jobs.append(job)

    def _filled(self, future: Future, index: int) -> None:
        slide = self.open[index]
        slide.jobs_left -= 1
        if future.cancelled():
            pass
        elif future.exception() is not None:
            if not slide.failed:
                slide.failed = True
                self.record(index, _failed(slide.plan.slide, future.exception()))
                for job in slide.jobs:  # the slide is lost: skip its queued work
                    job.cancel()
        else:
            self.progress.tiles_done(future.result())
        if slide.jobs_left == 0:
            del self.open[index]
            if slide.failed:
                abandon_slide(slide.plan)
            else:
                self._finish(index, slide.plan)

    def _finish(self, index: int, plan: SlidePlan) -> None:
        try:
            self.record(index, finish_slide(plan))
        except Exception as exc:
            abandon_slide(plan)
            self.record(index, _failed(plan.slide, exc))


#: Shards a worker fills in one job at most. Each job a process takes of a new slide costs
#: it a stain colour table (~0.15 s), so small slides stay whole in one job.
_MAX_JOB_SHARDS = 8


def _shard_groups(n_shards: int, workers: int) -> list[list[int]]:
    """Contiguous runs of shards, one job each: long enough for a process to overlap reading
    with writing and to amortise its per-slide set-up, short enough to spread one large
    slide over every worker and to report progress often."""
    if n_shards <= _MAX_JOB_SHARDS:
        return [list(range(n_shards))]
    per_job = max(2, min(_MAX_JOB_SHARDS, -(-n_shards // (4 * workers))))
    return [list(range(s, min(s + per_job, n_shards))) for s in range(0, n_shards, per_job)]


def _log_result(result: SlideResult) -> None:
    if result.status == "failed":
        logger.error("%s: failed: %s", result.slide_id, result.error)
    elif result.status == "no_tissue":
        logger.warning("%s: no tissue found; 0 patches", result.slide_id)
    else:
        logger.info("%s: %s, %d patches in %.1f s", result.slide_id, result.status, result.n_patches, result.seconds)


def _write_summary(out_dir: Path, results: list[SlideResult]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_SUMMARY_FIELDS)
    for r in results:
        writer.writerow([r.slide_id, str(r.path), r.status, r.n_patches, f"{r.seconds:.2f}", r.error])
    atomic_write_text(out_dir / SUMMARY_NAME, buffer.getvalue())


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Create ``out_dir`` and hold an exclusive lock on it for the run."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = open(out_dir / _LOCK_NAME, "a+")  # noqa: SIM115 (held for the whole run)
    except OSError as exc:
        raise OutputError(f"cannot write to the output folder {out_dir} ({exc.strerror}); choose another with -o") from exc
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OutputError(f"another gsd-wsi run is writing to {out_dir}; wait for it or use another -o") from exc
        if not os.access(out_dir, os.W_OK):
            raise OutputError(f"cannot write to the output folder {out_dir}; choose another with -o")
        yield
    finally:
        fh.close()


__all__ = ["SUMMARY_NAME", "run_tile"]
