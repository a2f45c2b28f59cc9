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
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

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

        if workers == 1:
            _run_serial(todo, out_dir, config, target_rgb, overwrite, progress, record)
        else:
            _run_parallel(todo, out_dir, config, target_rgb, overwrite, workers, progress, record)
        _write_summary(out_dir, [results[k] for k in sorted(results)])
        progress.finish()
    return [results[k] for k in sorted(results)]


def _failed(item: SlideInput, exc: BaseException) -> SlideResult:
    message = str(exc) if isinstance(exc, GsdWsiError) else f"{type(exc).__name__}: {exc}"
    return SlideResult(item.slide_id, item.path, "failed", error=message.replace("\n", " "))


def _run_serial(todo, out_dir, config, target_rgb, overwrite, progress, record) -> None:  # type: ignore[no-untyped-def]
    for index, item in todo:
        plan: SlidePlan | None = None
        try:
            planned = plan_slide(item, out_dir, config, target_rgb, overwrite)
            if isinstance(planned, SlideResult):
                record(index, planned)
                continue
            plan = planned
            progress.slide_started(item.slide_id, plan.n_patches)
            read_xy = planned_read_xy(plan)
            for shard, (start, stop) in enumerate(plan.shards):
                progress.tiles_done(fill_shards(plan, [shard], read_xy[start:stop]))
            record(index, finish_slide(plan))
        except Exception as exc:  # one slide's failure never stops the others
            if plan is not None:
                abandon_slide(plan)
            record(index, _failed(item, exc))


def _run_parallel(todo, out_dir, config, target_rgb, overwrite, workers, progress, record) -> None:  # type: ignore[no-untyped-def]
    # spawn, not fork: zarr keeps an event-loop thread that a forked child would inherit dead.
    pending = deque(todo)
    planning: dict[Future, tuple[int, SlideInput]] = {}
    filling: dict[Future, int] = {}             # shard future -> input index
    open_plans: dict[int, tuple[SlidePlan, int]] = {}  # input index -> (plan, shards left)
    failed_slides: set[int] = set()
    lookahead = workers + 1
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        def plan_more() -> None:
            while pending and len(planning) + len(open_plans) < lookahead:
                index, item = pending.popleft()
                planning[pool.submit(plan_slide, item, out_dir, config, target_rgb, overwrite)] = (index, item)

        plan_more()
        while planning or filling:
            done, _ = wait(set(planning) | set(filling), return_when=FIRST_COMPLETED)
            for future in done:
                if future in planning:
                    index, item = planning.pop(future)
                    try:
                        planned = future.result()
                    except Exception as exc:
                        record(index, _failed(item, exc))
                        continue
                    if isinstance(planned, SlideResult):
                        record(index, planned)
                        continue
                    progress.slide_started(item.slide_id, planned.n_patches)
                    shards = planned.shards
                    if not shards:
                        record(index, finish_slide(planned))
                        continue
                    read_xy = planned_read_xy(planned)
                    open_plans[index] = (planned, len(shards))
                    for shard, (start, stop) in enumerate(shards):
                        filling[pool.submit(fill_shards, planned, [shard], read_xy[start:stop])] = index
                else:
                    index = filling.pop(future)
                    plan, left = open_plans[index]
                    try:
                        progress.tiles_done(future.result())
                    except Exception as exc:
                        if index not in failed_slides:
                            failed_slides.add(index)
                            record(index, _failed(plan.slide, exc))
                    left -= 1
                    open_plans[index] = (plan, left)
                    if left == 0:
                        del open_plans[index]
                        if index in failed_slides:
                            abandon_slide(plan)
                        else:
                            try:
                                record(index, finish_slide(plan))
                            except Exception as exc:
                                abandon_slide(plan)
                                record(index, _failed(plan.slide, exc))
            plan_more()


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
