"""`gsd-wsi cohort`: many slides through tile and segment on dask.distributed.

Every slide is one task per stage (:func:`gsd_wsi.stages.cohort_task.run_stage_task`), on
a ``LocalCluster`` of worker processes or on an existing scheduler (SLURM, Kubernetes, SSH:
anything dask.distributed runs on). The client only plans, submits and records:

- **Checked before any work.** Every manifest problem (missing files, duplicate or unsafe
  ids, bad cells), a model folder that is not a segmentation model, and an output folder
  holding another model's or other settings' results are reported together, and nothing runs.
- **Explicit task keys** (stage, slide id, settings hash): dask would otherwise merge calls
  it takes for identical, and two clients of one scheduler share a task instead of doing
  it twice.
- **Failures stay with their slide.** A slide's own error comes back as a ``failed``
  record; transient I/O errors are retried (``retries``); a worker that dies mid-slide is
  replaced, its task rescheduled, and after ``allowed-failures`` deaths dask raises
  ``KilledWorker``, which is recorded as that slide's failure.
- **Resumable, and safe with concurrent runs.** Each slide is claimed with an O_EXCL lock
  and its state kept in ``OUT/<slide_id>/status.json``; a rerun skips what is finished with
  the same settings, recovers locks of dead processes, and a slide another live run holds
  is retried later rather than done twice.
- **Worker processes are not daemonic** (``distributed.worker.daemon: False``): daemonic
  processes may not start processes of their own, which tasks that use process pools need.
- At the end ``OUT/cohort_summary.csv`` (a row per slide and stage) and ``OUT/report.html``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gsd_wsi import __version__
from gsd_wsi.atomic import atomic_write_csv
from gsd_wsi.errors import ConfigError, OutputError, SchedulerError
from gsd_wsi.manifest import SlideInput, check_ids, collect_inputs
from gsd_wsi.stages.claim import DEFAULT_STALE_S, SlideBusy, claim_slide, read_status, write_stage_status
from gsd_wsi.stages.cohort_task import FINISHED, STAGES, StageJob, StageRecord, TransientSlideError, run_stage_task
from gsd_wsi.stages.segment_config import SegmentConfig
from gsd_wsi.stages.tile_config import TileConfig

logger = logging.getLogger(__name__)

SUMMARY_NAME, REPORT_NAME = "cohort_summary.csv", "report.html"
#: Longest pause before asking again for a slide that another run holds.
_BUSY_WAIT_MAX_S = 30.0


@dataclass(frozen=True)
class CohortConfig:
    """How a cohort is run; the stage settings are those of `gsd-wsi tile` and `segment`."""

    stages: tuple[str, ...] = STAGES
    scheduler: str = "local"            # "local" or a scheduler address, e.g. tcp://head:8786
    workers: int = 2                    # local worker processes
    threads_per_worker: int = 1         # slides at once per worker process
    retries: int = 1                    # extra tries for transient errors and killed workers
    timeout_per_slide_s: float | None = None
    connect_timeout_s: float = 10.0
    stale_lock_s: float = DEFAULT_STALE_S
    overwrite: bool = False
    gpu_resource: bool = False          # segment tasks ask for resources={"GPU": 1}
    report_title: str | None = None     # default: the output folder's name
    tile: TileConfig = field(default_factory=TileConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    report: bool = True

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"--stages must be a comma-separated subset of {','.join(STAGES)} (got "
                              f"{','.join(self.stages) or 'nothing'})")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"--stages names a stage twice ({','.join(self.stages)})")
        checks = [("--workers", self.workers, 1), ("--threads-per-worker", self.threads_per_worker, 1),
                  ("--retries", self.retries, 0)]
        for name, value, low in checks:
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer of at least {low} (got {value!r})")
        if self.timeout_per_slide_s is not None and not self.timeout_per_slide_s > 0:
            raise ConfigError(f"--timeout-per-slide must be positive seconds (got {self.timeout_per_slide_s})")
        if not self.connect_timeout_s > 0 or not self.stale_lock_s > 0:
            raise ConfigError("connect_timeout_s and stale_lock_s must be positive seconds")

    @property
    def ordered_stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("tile", "segment")}
        data["stages"] = list(self.ordered_stages)
        if "tile" in self.stages:
            data["tile"] = self.tile.to_dict()
        if "segment" in self.stages:
            data["segment"] = self.segment.to_dict()
        return data


@dataclass(frozen=True)
class SlideOutcome:
    """One slide over all its stages."""

    slide: SlideInput
    records: dict[str, StageRecord]

    @property
    def status(self) -> str:
        statuses = [r.status for r in self.records.values()]
        if "failed" in statuses:
            return "failed"
        if "no_tissue" in statuses:
            return "no_tissue"
        return "skipped" if statuses and all(s == "skipped" for s in statuses) else "done"


@dataclass(frozen=True)
class CohortResult:
    out_dir: Path
    slides: list[SlideOutcome]
    wall_s: float
    summary_path: Path
    report_path: Path | None
    dashboard: str | None = None

    def count(self, status: str) -> int:
        return sum(1 for s in self.slides if s.status == status)

    @property
    def slides_per_hour(self) -> float:
        worked = len(self.slides) - self.count("skipped")
        return worked / self.wall_s * 3600.0 if self.wall_s > 0 else 0.0


class CohortProgress(Protocol):
    def start(self, n_slides: int, dashboard: str | None) -> None: ...
    def stage_done(self, record: StageRecord) -> None: ...
    def slide_done(self, outcome: SlideOutcome) -> None: ...
    def finish(self) -> None: ...


class NullCohortProgress:
    def start(self, n_slides: int, dashboard: str | None) -> None:
        pass

    def stage_done(self, record: StageRecord) -> None:
        pass

    def slide_done(self, outcome: SlideOutcome) -> None:
        pass

    def finish(self) -> None:
        pass


# -- before any work -----------------------------------------------------------------------


def cohort_inputs(sources: Sequence[str | Path], out_dir: Path, slide_mpp: float | None = None) -> list[SlideInput]:
    """The slides of ``sources`` (CSV manifests, folders, files), or ConfigError listing EVERY
    problem: missing files, duplicate or unsafe ids, unreadable cells, outputs outside OUT."""
    problems: list[str] = []
    inputs: list[SlideInput] = []
    for source in sources:
        try:
            inputs.extend(collect_inputs([source], slide_mpp))
        except ConfigError as exc:  # a manifest without a path column, an unreadable CSV
            problems.append(str(exc))
    inputs = check_ids(inputs)  # again over all sources: an id may repeat across manifests
    root = out_dir.resolve()
    for item in inputs:
        if item.error is not None:
            problems.append(item.error)
        elif not item.path.exists():
            problems.append(f"{item.path}: no such file (slide {item.slide_id!r})")
        elif (root / item.slide_id).resolve().parent != root:
            problems.append(f"slide id {item.slide_id!r} would write outside {out_dir}")
    if not inputs and not problems:
        problems.append("no slides given")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{len(problems)} problem(s) with the slides; nothing was run:\n{listed}")
    return [dataclasses.replace(i, path=i.path.resolve()) for i in inputs]


def stage_hash(stage: str, item: SlideInput, config: CohortConfig, model_digest: str | None) -> str:
    """What a stage's output for a slide depends on: its settings, the model, the slide file
    (path, size), the slide's resolution override and tissue overrides."""
    settings = config.tile.output_settings() if stage == "tile" else config.segment.output_settings()
    payload = {"stage": stage, "settings": settings, "model": model_digest if stage == "segment" else None,
               "slide": {"path": str(item.path), "bytes": item.path.stat().st_size, "mpp": item.mpp,
                         "tissue": item.tissue}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_model(model: str | Path | None, config: CohortConfig) -> tuple[Path | str | None, str | None]:
    """The segment stage's model (a resolved folder, or a built-in name; None: the built-in
    nuclei model) and its digest; refuses anything but a segmentation model."""
    if "segment" not in config.stages:
        return None, None
    from gsd_wsi.stages.segment_model import ModelChoice
    from gsd_wsi.zoo import DEFAULT_FAMILY

    choice = ModelChoice(DEFAULT_FAMILY if model is None else model, device="cpu")
    if choice.builtin is not None:
        return choice.builtin, choice.digest
    return choice.for_mpp(None).folder.resolve(), choice.digest


def _check_previous(out_dir: Path, inputs: list[SlideInput], hashes: dict[tuple[str, str], str],
                    config: CohortConfig) -> None:
    """Refuse an output folder holding results made with another model or other settings."""
    if config.overwrite:
        return
    changed = []
    for item in inputs:
        stages = read_status(out_dir / item.slide_id)["stages"]
        for stage in config.ordered_stages:
            entry = stages.get(stage) or {}
            if entry.get("status") in FINISHED and entry.get("settings_hash") != hashes[(item.slide_id, stage)]:
                changed.append(f"{item.slide_id} ({stage})")
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise OutputError(f"{out_dir} holds results made with another model or other settings for {shown}; "
                          f"use --overwrite to replace them, or another -o")


# -- the cluster ---------------------------------------------------------------------------


@contextmanager
def dask_client(config: CohortConfig) -> Iterator[Any]:
    """A ``distributed.Client``: a LocalCluster of ``workers`` processes, or the scheduler at
    ``config.scheduler`` (failing within ``connect_timeout_s`` when it cannot be reached)."""
    import dask
    from distributed import Client, LocalCluster

    settings = {
        "distributed.worker.daemon": False,   # tasks may start processes
        "distributed.scheduler.allowed-failures": config.retries,
        # a worker holds only the slides it is running: when one dies, dask counts a death
        # against every task assigned to it, and a queued slide must not pay for another's crash
        "distributed.scheduler.worker-saturation": 1.0,
        "distributed.comm.timeouts.connect": f"{config.connect_timeout_s}s",
        # dask's nanny sets MALLOC_TRIM_THRESHOLD_ in the workers it spawns; any value fixes
        # glibc's mmap threshold at 128 KiB, so every tensor torch frees goes back to the OS
        # and its next one faults in fresh pages: the network ran 2x slower on CPU. Unset,
        # the workers allocate as `gsd-wsi segment` does (a user's own setting is kept).
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    }
    quiet = logging.getLogger("gsd_wsi").getEffectiveLevel() > logging.DEBUG
    with dask.config.set(settings), _log_level("distributed", logging.WARNING if quiet else logging.INFO):
        # the settings are held for the whole run: a restarted worker reads them again
        if config.scheduler == "local":
            # a free port, so that concurrent runs on one machine each get a dashboard (with bokeh)
            with LocalCluster(n_workers=config.workers, threads_per_worker=config.threads_per_worker, processes=True,
                              dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
                    Client(cluster) as client:
                yield client
        else:
            try:
                client = Client(config.scheduler, timeout=f"{config.connect_timeout_s}s")
            except Exception as exc:  # noqa: BLE001 (refused, timed out, or not a dask scheduler at all)
                raise SchedulerError(
                    f"cannot reach the dask scheduler at {config.scheduler} within {config.connect_timeout_s:g} s "
                    f"({type(exc).__name__}: {str(exc)[:200]}); check the address (tcp://HOST:8786) and that `dask scheduler` "
                    f"runs there, or use --scheduler local") from exc
            with client:
                yield client


@contextmanager
def _log_level(name: str, level: int) -> Iterator[None]:
    """dask's scheduler and nannies log every worker start and stop at INFO; -v shows them."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


def _dashboard(client: Any, local: bool) -> str | None:
    """The dashboard's address where one is served (a local one needs bokeh installed here)."""
    import importlib.util

    if local and importlib.util.find_spec("bokeh") is None:
        return None
    try:
        return client.dashboard_link if client.scheduler_info().get("services", {}).get("dashboard") else None
    except Exception:  # noqa: BLE001 (the link is a convenience)
        return None


# -- the run -------------------------------------------------------------------------------


def run_cohort(sources: Sequence[str | Path], out_dir: str | Path, model: str | Path | None = None,
               config: CohortConfig = CohortConfig(), slide_mpp: float | None = None,
               progress: CohortProgress | None = None) -> CohortResult:
    """Run ``config.stages`` over every slide; returns when each slide is finished or failed.

    Raises only for problems with the whole run (bad options or manifest, a model that is not
    a segmentation model, an output folder of other settings, an unreachable scheduler).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    progress = progress or NullCohortProgress()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out_dir} ({exc.strerror}); choose another with -o") from exc
    inputs = cohort_inputs(sources, out_dir, slide_mpp)
    model_dir, model_digest = _check_model(model, config)
    # a manifest's ``model`` column: that slide's own model, checked like --model
    own = {spec: _check_model(spec, config) for spec in sorted({i.model for i in inputs if i.model})}
    models = {i.slide_id: own[i.model] if i.model else (model_dir, model_digest) for i in inputs}
    hashes = {(i.slide_id, s): stage_hash(s, i, config, models[i.slide_id][1]) for i in inputs
              for s in config.ordered_stages}
    _check_previous(out_dir, inputs, hashes, config)

    run = _Run(out_dir.resolve(), inputs, hashes, config, {k: ref for k, (ref, _) in models.items()}, progress)
    with dask_client(config) as client:
        dashboard = _dashboard(client, config.scheduler == "local")
        if dashboard:
            logger.debug("dask dashboard: %s", dashboard)
        progress.start(len(inputs), dashboard)
        try:
            run.execute(client)
        finally:  # also when interrupted: the summary and report of what was done
            progress.finish()
            result = run.result(time.perf_counter() - started, dashboard)
            write_summary(result)
            if config.report:
                result = dataclasses.replace(result, report_path=write_cohort_report(result, config, model_dir))
    return result


class _Run:
    """The client's side of one run: submits each slide's stages in order, records results."""

    def __init__(self, out_dir: Path, inputs: list[SlideInput], hashes: dict[tuple[str, str], str],
                 config: CohortConfig, models: dict[str, Path | str | None], progress: CohortProgress) -> None:
        self.out_dir, self.inputs, self.hashes, self.config = out_dir, inputs, hashes, config
        self.models, self.progress = models, progress  # slide id -> its model (a folder or built-in name)
        self.stages = config.ordered_stages
        self.records: dict[str, dict[str, StageRecord]] = {i.slide_id: {} for i in inputs}
        self.busy_rounds: dict[tuple[str, str], int] = {}
        # the cores this process may run on (taskset, a SLURM or container cpuset), which the
        # local workers inherit; os.cpu_count() counts the whole machine's
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        per_task = max(1, cores // (config.workers * config.threads_per_worker))
        local = config.scheduler == "local"  # on a remote cluster the workers' own cores are unknown here
        self.torch_threads = per_task if local else 0
        self.fill_threads = min(2, per_task) if local else 2

    def job(self, item: SlideInput, stage: str, wait_s: float = 0.0) -> StageJob:
        return StageJob(item, stage, self.out_dir, self.hashes[(item.slide_id, stage)], self.config.tile,  # type: ignore[arg-type]
                        self.config.segment, self.models[item.slide_id], self.config.overwrite, self.config.timeout_per_slide_s,
                        self.config.stale_lock_s, self.torch_threads, self.fill_threads, wait_s)

    def submit(self, client: Any, item: SlideInput, stage: str, wait_s: float = 0.0) -> Any:
        key = f"{stage}-{item.slide_id}-{self.hashes[(item.slide_id, stage)]}"
        rounds = self.busy_rounds.get((item.slide_id, stage), 0)
        if rounds:
            key += f"-again{rounds}"
        resources = {"GPU": 1} if stage == "segment" and self.config.gpu_resource else None
        # later stages first, so that slides finish whole (a killed run leaves fewer half-done)
        priority = self.stages.index(stage)
        return client.submit(run_stage_task, self.job(item, stage, wait_s), key=key, retries=self.config.retries,
                             resources=resources, priority=priority, pure=False)

    def execute(self, client: Any) -> None:
        from distributed import as_completed

        by_key: dict[str, tuple[SlideInput, str]] = {}
        futures = []
        for item in self.inputs:
            future = self.submit(client, item, self.stages[0])
            by_key[future.key] = (item, self.stages[0])
            futures.append(future)
        pending = as_completed(futures)
        for future in pending:
            item, stage = by_key.pop(future.key)
            record = self._outcome(future, item, stage)
            future.release()
            if record.status == "busy":
                rounds = self.busy_rounds[(item.slide_id, stage)] = self.busy_rounds.get((item.slide_id, stage), 0) + 1
                logger.info("%s: %s; asking again later", item.slide_id, record.error)
                again = self.submit(client, item, stage, wait_s=min(2.0 * rounds, _BUSY_WAIT_MAX_S))
                by_key[again.key] = (item, stage)
                pending.add(again)
                continue
            self._record(item, record)
            later = self.stages[self.stages.index(stage) + 1:]
            if later and record.status in FINISHED:
                nxt = self.submit(client, item, later[0])
                by_key[nxt.key] = (item, later[0])
                pending.add(nxt)
            else:
                for skipped in later:  # the slide failed an earlier stage: its later ones are not run
                    self._record(item, StageRecord(item.slide_id, skipped, "failed", self.hashes[(item.slide_id, skipped)],
                                                   error=f"not run: the {stage} stage failed", error_kind="not run"))

    def _outcome(self, future: Any, item: SlideInput, stage: str) -> StageRecord:
        from distributed.scheduler import KilledWorker

        try:
            return future.result()
        except KilledWorker as exc:
            record = StageRecord(item.slide_id, stage, "failed", self.hashes[(item.slide_id, stage)],
                                 attempts=self.config.retries + 1, error_kind="KilledWorker",
                                 error=f"the worker process died while processing this slide, {self.config.retries + 1} "
                                       f"time(s) (out of memory, a crash in a reader library, or killed): {exc}")
            self._write_status(item, record)
            return record
        except TransientSlideError as exc:
            previous = read_status(self.out_dir / item.slide_id)["stages"].get(stage, {})
            return StageRecord(item.slide_id, stage, "failed", self.hashes[(item.slide_id, stage)],
                               attempts=int(previous.get("attempts", self.config.retries + 1)),
                               error=f"{exc} (after {self.config.retries + 1} tries)",
                               error_kind=str(previous.get("error_kind") or "transient"), host=previous.get("host", ""))
        except Exception as exc:  # noqa: BLE001 (anything else the cluster raised belongs to this slide)
            record = StageRecord(item.slide_id, stage, "failed", self.hashes[(item.slide_id, stage)],
                                 error=f"{type(exc).__name__}: {exc}", error_kind=type(exc).__name__)
            self._write_status(item, record)
            return record

    def _write_status(self, item: SlideInput, record: StageRecord) -> None:
        """Record a failure the worker could not (it died): under the slide's claim, recovering
        the dead worker's lock; if another live process holds the claim, leave it to that one."""
        slide_dir = self.out_dir / item.slide_id
        try:
            with claim_slide(slide_dir, self.config.stale_lock_s):
                write_stage_status(slide_dir, item.slide_id, str(item.path), record.stage, record.to_status())
        except (SlideBusy, OSError) as exc:
            logger.warning("%s: could not record the failure in status.json (%s)", item.slide_id, exc)

    def _record(self, item: SlideInput, record: StageRecord) -> None:
        self.records[item.slide_id][record.stage] = record
        if record.status == "failed":
            log = logger.info if record.error_kind == "not run" else logger.error
            log("%s: %s failed: %s", item.slide_id, record.stage, record.error)
        self.progress.stage_done(record)
        if record.stage == self.stages[-1]:
            self.progress.slide_done(SlideOutcome(item, dict(self.records[item.slide_id])))

    def result(self, wall_s: float, dashboard: str | None) -> CohortResult:
        slides = []
        for item in self.inputs:
            records = dict(self.records[item.slide_id])
            for stage in self.stages:  # an interrupted run: what is on disk, else "not run"
                if stage not in records:
                    entry = read_status(self.out_dir / item.slide_id)["stages"].get(stage) or {}
                    current = entry.get("settings_hash") == self.hashes[(item.slide_id, stage)]
                    records[stage] = (StageRecord.from_status(item.slide_id, stage, entry)
                                      if current and entry.get("status") in (*FINISHED, "failed") else
                                      StageRecord(item.slide_id, stage, "failed", error="not run (the run was stopped)",
                                                  error_kind="not run"))
            slides.append(SlideOutcome(item, records))
        return CohortResult(self.out_dir, slides, wall_s, self.out_dir / SUMMARY_NAME, None, dashboard)


# -- summary and report --------------------------------------------------------------------


def write_summary(result: CohortResult) -> Path:
    """``cohort_summary.csv``: one row per slide and stage."""
    class_names = sorted({name for s in result.slides for r in s.records.values()
                          for name in r.details.get("class_mm2", {})})
    columns = ["slide_id", "stage", "status", "attempts", "seconds", "n_patches", "n_windows", "tissue_mm2",
               *[f"{c}_mm2" for c in class_names], "output_bytes", "host", "error_kind", "error", "settings_hash", "path"]
    rows = []
    for slide in result.slides:
        for stage, r in slide.records.items():
            d = r.details
            row = {"slide_id": r.slide_id, "stage": stage, "status": r.status, "attempts": r.attempts,
                   "seconds": f"{r.seconds:.2f}", "n_patches": d.get("n_patches", ""), "n_windows": d.get("n_windows", ""),
                   "tissue_mm2": f"{d['tissue_mm2']:.4f}" if "tissue_mm2" in d else "",
                   "output_bytes": sum(r.outputs.values()) if r.outputs else "", "host": r.host,
                   "error_kind": r.error_kind, "error": r.error, "settings_hash": r.settings_hash,
                   "path": str(slide.slide.path)}
            rows.append(row | {f"{c}_mm2": f"{a:.4f}" for c, a in d.get("class_mm2", {}).items()})
    atomic_write_csv(result.summary_path, rows, columns)
    return result.summary_path


def write_cohort_report(result: CohortResult, config: CohortConfig, model_dir: Path | str | None) -> Path:
    """``report.html``: a row per slide with its overlay, areas, times and errors, and plots."""
    from gsd_wsi.report import ReportRow, write_report

    rows = []
    for slide in result.slides:
        recs = slide.records
        seg, tile = recs.get("segment"), recs.get("tile")
        details = dict(seg.details) if seg else {}
        if tile is not None:
            details["n_patches"] = tile.details.get("n_patches")
        failed = [r for r in recs.values() if r.status == "failed"]
        slide_dir = result.out_dir / slide.slide.slide_id
        picture = next((p for p in (slide_dir / "segment" / "overlay.png", slide_dir / "tile" / "tissue.png")
                        if p.is_file()), None)
        rows.append(ReportRow(
            slide_id=slide.slide.slide_id, slide_path=str(slide.slide.path), status=slide.status,
            stage_status={s: r.status for s, r in recs.items()},
            error="\n".join(f"{r.stage}: {r.error}" for r in failed if r.error_kind != "not run") or
                  "\n".join(f"{r.stage}: {r.error}" for r in failed),
            error_kind=failed[0].error_kind if failed else "",
            seconds={s: r.seconds for s, r in recs.items()},
            tissue_mm2=details.get("tissue_mm2"), class_mm2=dict(details.get("class_mm2") or {}),
            n_windows=details.get("n_windows"), n_patches=details.get("n_patches"), thumbnail=picture,
            host=next((r.host for r in recs.values() if r.host), ""), attempts=max((r.attempts for r in recs.values()), default=0),
        ))
    settings = {"stages": ",".join(config.ordered_stages), "model": str(model_dir) if model_dir else "",
                "scheduler": config.scheduler, "workers": config.workers, "gsd_wsi_version": __version__,
                "settings": config.to_dict()}
    return write_report(result.out_dir / REPORT_NAME, rows, title=config.report_title or f"gsd-wsi cohort: {result.out_dir.name}",
                        settings=settings, wall_s=result.wall_s)

