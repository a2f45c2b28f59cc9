"""One slide through one stage, as a task on a dask worker: claim, skip or run, record.

:func:`run_stage_task` is what `gsd-wsi cohort` submits. It runs in a worker process (on
this machine or a cluster node), so it takes everything it needs in one picklable
:class:`StageJob` and returns a picklable :class:`StageRecord`. A slide's own failure (a
corrupt file, no resolution, not brightfield, a timeout) is returned as a ``failed`` record;
only transient errors (I/O, a lost connection) are raised, as :class:`TransientSlideError`,
so that dask's ``retries=`` tries the slide again.

Outputs of a slide, in ``OUT/<slide_id>/``::

    .lock            held while a process works on the slide (see claim.py)
    status.json      one entry per stage: status, attempts, seconds, error, host, sizes, hash
    tile/            patches.zarr, tissue.png              (gsd-wsi tile)
    segment/         mask.ome.zarr, mask.tiff, ...          (gsd-wsi segment)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gsd_wsi.atomic import remove_stale_temporaries
from gsd_wsi.errors import GsdWsiError, SlideTimeoutError
from gsd_wsi.manifest import SlideInput
from gsd_wsi.progress import NullProgress
from gsd_wsi.stages.claim import SlideBusy, claim_slide, folder_bytes, read_status, this_host, write_stage_status
from gsd_wsi.stages.segment_config import SegmentConfig
from gsd_wsi.stages.tile_config import TileConfig

logger = logging.getLogger(__name__)

Stage = Literal["tile", "segment"]
STAGES: tuple[Stage, ...] = ("tile", "segment")
#: Statuses a rerun keeps (with the same settings hash) instead of redoing the stage.
FINISHED = ("done", "no_tissue", "skipped")


@dataclass(frozen=True)
class StageJob:
    """Everything one task needs (picklable; paths absolute)."""

    slide: SlideInput
    stage: Stage
    out_dir: Path
    settings_hash: str
    tile: TileConfig
    segment: SegmentConfig
    model_dir: Path | str | None       # a model folder or a built-in model's name
    overwrite: bool = False
    timeout_s: float | None = None     # per slide and stage; checked between batches
    stale_lock_s: float = 6 * 3600.0
    torch_threads: int = 0             # 0: leave torch's own choice
    fill_threads: int = 2
    wait_s: float = 0.0                # sleep first (a slide another run was busy with)

    @property
    def slide_dir(self) -> Path:
        return self.out_dir / self.slide.slide_id


@dataclass(frozen=True)
class StageRecord:
    """What became of one slide in one stage; ``busy`` means another process held it."""

    slide_id: str
    stage: str
    status: str                        # done | skipped | no_tissue | failed | busy
    settings_hash: str = ""
    attempts: int = 0
    seconds: float = 0.0
    error: str = ""
    error_kind: str = ""
    host: str = ""
    outputs: dict[str, int] = field(default_factory=dict)   # file or folder -> bytes
    details: dict[str, Any] = field(default_factory=dict)   # n_patches | n_windows, tissue_mm2, class_mm2

    def to_status(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("slide_id", "stage"):
            data.pop(key)
        return data

    @classmethod
    def from_status(cls, slide_id: str, stage: str, entry: dict[str, Any]) -> StageRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"slide_id", "stage"}
        return cls(slide_id, stage, **{k: v for k, v in entry.items() if k in known})


class TransientSlideError(Exception):
    """A failure worth another try (raised so that dask retries the task)."""


def is_transient(exc: BaseException) -> bool:
    """I/O and connection errors may pass; our own errors (corrupt file, no resolution, not
    brightfield, timeout) and programming errors will not."""
    return isinstance(exc, (OSError, ConnectionError)) and not isinstance(exc, GsdWsiError)


class _Deadline(NullProgress):
    """Progress that stops the slide, between batches, once its time is up."""

    def __init__(self, slide_id: str, timeout_s: float | None) -> None:
        self.slide_id, self.timeout_s = slide_id, timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def tiles_done(self, n_tiles: int) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise SlideTimeoutError(f"{self.slide_id}: stopped after the per-slide limit of {self.timeout_s:g} s "
                                    f"(--timeout-per-slide); raise it for slides this large")


def run_stage_task(job: StageJob) -> StageRecord:
    """Claim the slide, skip it when finished with the same settings, else run the stage."""
    if job.wait_s > 0:
        time.sleep(job.wait_s)
    slide_id, slide_dir = job.slide.slide_id, job.slide_dir
    try:
        with claim_slide(slide_dir, job.stale_lock_s):
            if remove_stale_temporaries(slide_dir):  # ours to clean: we hold the slide
                logger.info("%s: removed the unfinished outputs of an interrupted run", slide_id)
            previous = read_status(slide_dir)["stages"].get(job.stage, {})
            same = previous.get("settings_hash") == job.settings_hash
            if same and previous.get("status") in FINISHED and not job.overwrite and _outputs_exist(job):
                # skipped, with what the run that did it recorded (its seconds, sizes, areas)
                return dataclasses.replace(StageRecord.from_status(slide_id, job.stage, previous), status="skipped")
            attempts = int(previous.get("attempts", 0)) + 1 if same and previous.get("status") in ("failed", "running") else 1
            _record(job, StageRecord(slide_id, job.stage, "running", job.settings_hash, attempts, host=this_host()))
            return _run_claimed(job, attempts)
    except SlideBusy as busy:
        return StageRecord(slide_id, job.stage, "busy", job.settings_hash, error=str(busy))


def _run_claimed(job: StageJob, attempts: int) -> StageRecord:
    started = time.perf_counter()
    base = StageRecord(job.slide.slide_id, job.stage, "failed", job.settings_hash, attempts, host=this_host())
    try:
        status, details = _STAGE_RUNNERS[job.stage](job)
    except Exception as exc:
        from gsd_wsi.stages.batch import failure_message

        failed = dataclasses.replace(base, seconds=time.perf_counter() - started, error=failure_message(exc),
                                     error_kind=type(exc).__name__)
        _record(job, failed)
        if is_transient(exc):
            raise TransientSlideError(failed.error) from exc
        return failed
    done = dataclasses.replace(base, status=status, seconds=time.perf_counter() - started, details=details,
                               outputs=_output_sizes(job))
    _record(job, done)
    return done


def _record(job: StageJob, record: StageRecord) -> None:
    write_stage_status(job.slide_dir, job.slide.slide_id, str(job.slide.path), job.stage, record.to_status())


def stage_dir(job: StageJob) -> Path:
    return job.slide_dir / job.stage


def _outputs_exist(job: StageJob) -> bool:
    return stage_dir(job).is_dir()


def _output_sizes(job: StageJob) -> dict[str, int]:
    folder = stage_dir(job)
    return {p.name: folder_bytes(p) for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def _run_tile(job: StageJob) -> tuple[str, dict[str, Any]]:
    from gsd_wsi.stages.tile import tile_slide

    result = tile_slide(job.slide, job.slide_dir, job.tile, _stain_target(job.tile.stain_target), job.overwrite,
                        slide_dir=stage_dir(job), progress=_Deadline(job.slide.slide_id, job.timeout_s),
                        threads=job.fill_threads)
    status = {"ok": "done", "skipped": "done"}.get(result.status, result.status)
    return status, {"n_patches": result.n_patches}


def _run_segment(job: StageJob) -> tuple[str, dict[str, Any]]:
    from gsd_wsi.stages.segment import segment_slide

    assert job.model_dir is not None
    _set_torch_threads(job.torch_threads)
    model = _model(job.model_dir, job.segment.device, job.segment.tta)
    config = dataclasses.replace(job.segment, tissue=job.slide.tissue_config(job.segment.tissue))
    result = segment_slide(job.slide.path, model, job.slide_dir, config, job.slide.slide_id, job.slide.mpp,
                           job.overwrite, progress=_Deadline(job.slide.slide_id, job.timeout_s),
                           slide_dir=stage_dir(job))
    status = {"ok": "done", "skipped": "done"}.get(result.status, result.status)
    return status, {"n_windows": result.n_windows, "tissue_mm2": result.tissue_mm2, "class_mm2": result.class_mm2}


_STAGE_RUNNERS = {"tile": _run_tile, "segment": _run_segment}


@functools.lru_cache(maxsize=2)
def _model(model_dir: Path | str, device: str, tta: bool | None):  # noqa: ANN202 (torch stays out of this module's import)
    """The model (a folder's, or a built-in family's member per slide), loaded once per worker
    process and kept for its next slides."""
    from gsd_wsi.stages.segment_model import ModelChoice
    from gsd_wsi.train.ddp import resolve_device

    logger.info("worker %d: loading %s on %s", os.getpid(), model_dir, device)
    model = ModelChoice(model_dir, device=device, tta=tta)
    if resolve_device(device).type != "cuda" and "MALLOC_TRIM_THRESHOLD_" in os.environ:
        logger.warning("worker %d: MALLOC_TRIM_THRESHOLD_ is set (dask's nanny sets it by default), which makes "
                       "the network about 2x slower on the CPU; start the workers without it (dask config "
                       "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null)", os.getpid())
    return model


@functools.lru_cache(maxsize=4)
def _stain_target(path: Path | None):  # noqa: ANN202
    if path is None:
        return None
    from gsd_wsi.slide.image_backend import read_plain_image

    return read_plain_image(path)[0]


_torch_threads_set = False


def _set_torch_threads(n: int) -> None:
    """Share the cores between the worker processes of one machine (torch takes them all)."""
    global _torch_threads_set
    if n > 0 and not _torch_threads_set:
        import torch

        torch.set_num_threads(n)
        _torch_threads_set = True
