"""`gsd-wsi tile` over many slides: processes, failure isolation, resume, summary CSV.

With ``workers > 1`` the unit of work is a shard of one slide, not a slide, so a single
large slide uses every worker as well as a cohort does. A few slides are planned ahead
while others are read; a failure marks its own slide failed and the run goes on.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gsd_wsi.errors import GsdWsiError
from gsd_wsi.manifest import SlideInput, collect_inputs
from gsd_wsi.progress import NullProgress, Progress
from gsd_wsi.slide.image_backend import read_plain_image
from gsd_wsi.stages.batch import BatchRun, worker_pool
from gsd_wsi.stages.tile import (
    FILL_THREADS, SlidePlan, SlideResult, abandon_slide, fill_shards, finish_slide, plan_slide, planned_read_xy,
    tile_slide,
)
from gsd_wsi.stages.tile_config import TileConfig

logger = logging.getLogger(__name__)

SUMMARY_NAME = "tile_summary.csv"


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
    with BatchRun(out_dir, inputs, "tile", SlideResult.failed, progress) as batch:
        run = _Run(out_dir, config, target_rgb, overwrite, progress, batch)
        if workers == 1:
            _run_serial(batch.todo, run)
        else:
            _run_parallel(batch.todo, run, workers)
    return batch.results  # type: ignore[return-value]


@dataclass(frozen=True)
class _Run:
    """What every slide of one run shares."""

    out_dir: Path
    config: TileConfig
    target_rgb: np.ndarray | None
    overwrite: bool
    progress: Progress
    batch: BatchRun

    def record(self, index: int, result: SlideResult) -> None:
        self.batch.record(index, result)

    def fail(self, index: int, item: SlideInput, exc: BaseException) -> None:
        self.batch.fail(index, item, exc)

    def plan_args(self, item: SlideInput) -> tuple:
        return item, self.out_dir, self.config, self.target_rgb, self.overwrite


def _run_serial(todo: list[tuple[int, SlideInput]], run: _Run) -> None:
    for index, item in todo:
        try:
            run.record(index, tile_slide(*run.plan_args(item), progress=run.progress))
        except Exception as exc:  # one slide's failure never stops the others
            run.fail(index, item, exc)


def _run_parallel(todo: list[tuple[int, SlideInput]], run: _Run, workers: int) -> None:
    pool, listener = worker_pool(workers, ["gsd_wsi.stages.tile"])
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
        # Each process fills with up to FILL_THREADS threads, but no more threads in all than
        # cores: on 2 cores, two workers of two threads each only add a second process's set-up.
        self.fill_threads = max(1, min(FILL_THREADS, (os.cpu_count() or 1) // workers))
        self.progress, self.record, self.fail, self.plan_args = run.progress, run.record, run.fail, run.plan_args
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
            self.fail(index, item, exc)
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
            job = self.pool.submit(fill_shards, planned, group, read_xy[start:stop], threads=self.fill_threads)
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
                self.fail(index, slide.plan.slide, future.exception())
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
            self.fail(index, plan.slide, exc)


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


__all__ = ["SUMMARY_NAME", "run_tile"]
