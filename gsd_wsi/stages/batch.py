"""What every per-slide stage does around its slides: the exclusive output folder, failure
isolation, the summary CSV, results in input order, and worker processes that log through
the parent.

A stage gives a result type with ``slide_id``, ``path``, ``status``, ``seconds``, ``error``
``summary_row()`` and ``describe()``, and a function that makes a failed result; :class:`BatchRun` does
the rest::

    with BatchRun(out_dir, inputs, "segment", SegmentResult.failed, progress) as batch:
        batch.run_each(lambda item: segment_one(item))      # or record() as results come
    batch.results                                           # one per input, in order
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from gsd_wsi.atomic import atomic_write_csv, remove_stale_temporaries
from gsd_wsi.errors import GsdWsiError, OutputError
from gsd_wsi.manifest import SlideInput
from gsd_wsi.progress import NullProgress, Progress

logger = logging.getLogger(__name__)

Status = Literal["ok", "skipped", "no_tissue", "failed"]


class SlideOutcome(Protocol):
    slide_id: str
    path: Path
    status: str
    seconds: float
    error: str

    def summary_row(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


def failure_message(exc: BaseException) -> str:
    """One line for a failed slide: our own messages as they are, others with their type."""
    message = str(exc) if isinstance(exc, GsdWsiError) else f"{type(exc).__name__}: {exc}"
    return message.replace("\n", " ")


class BatchRun:
    """One run of a stage over many slides into one output folder (see the module docstring).

    Entering takes the folder's lock (another run on the same folder is refused), removes
    temporaries left by an interrupted run and records inputs that cannot be processed (a
    missing file, a duplicate id) as failed. Every recorded result rewrites the summary
    CSV, so it is current even if the run is killed.
    """

    def __init__(self, out_dir: Path, inputs: Sequence[SlideInput], stage: str,
                 failed: Callable[[SlideInput, str], SlideOutcome], progress: Progress | None = None) -> None:
        self.out_dir, self.stage, self.inputs = Path(out_dir), stage, list(inputs)
        self.failed, self.progress = failed, progress or NullProgress()
        self.summary_path = self.out_dir / f"{stage}_summary.csv"
        self._results: dict[int, SlideOutcome] = {}
        self._lock: AbstractContextManager[None] | None = None

    def __enter__(self) -> BatchRun:
        self._lock = exclusive_output(self.out_dir, self.stage)
        self._lock.__enter__()
        try:
            removed = remove_stale_temporaries(self.out_dir)
            if removed:
                logger.info("removed %d unfinished output(s) of an interrupted run", removed)
            self.progress.start(n_slides=len(self.inputs))
            for index, item in enumerate(self.inputs):
                if item.error is not None:
                    self.record(index, self.failed(item, item.error))
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.write_summary()
            self.progress.finish()
        finally:
            assert self._lock is not None
            self._lock.__exit__(exc_type, exc, tb)

    @property
    def todo(self) -> list[tuple[int, SlideInput]]:
        """Inputs without a result yet, with their index."""
        return [(i, item) for i, item in enumerate(self.inputs) if i not in self._results]

    @property
    def results(self) -> list[SlideOutcome]:
        return [self._results[k] for k in sorted(self._results)]

    def record(self, index: int, result: SlideOutcome) -> None:
        self._results[index] = result
        log_result(result)
        self.progress.slide_done(result)
        self.write_summary()

    def fail(self, index: int, item: SlideInput, exc: BaseException) -> None:
        self.record(index, self.failed(item, failure_message(exc)))

    def run_each(self, process: Callable[[SlideInput], SlideOutcome]) -> None:
        """Process the remaining inputs one after another; a failure is that slide's alone."""
        for index, item in self.todo:
            try:
                result = process(item)
            except Exception as exc:  # one slide's failure never stops the others
                self.fail(index, item, exc)
            else:
                self.record(index, result)

    def write_summary(self) -> None:
        rows = [r.summary_row() for r in self.results]
        atomic_write_csv(self.summary_path, rows, None if rows else ["slide_id", "path", "status", "error"])


def log_result(result: SlideOutcome) -> None:
    if result.status == "failed":
        logger.error("%s: failed: %s", result.slide_id, result.error)
    elif result.status == "no_tissue":
        logger.warning("%s: no tissue found", result.slide_id)
    else:
        logger.info("%s: %s, %s in %.1f s", result.slide_id, result.status, result.describe(), result.seconds)


@contextmanager
def exclusive_output(out_dir: Path, stage: str) -> Iterator[None]:
    """Create ``out_dir`` and hold an exclusive lock on it for the run (an flock, which the
    kernel releases when the process dies, so a killed run never leaves it locked)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = open(out_dir / f".gsd-wsi-{stage}.lock", "a+")  # noqa: SIM115 (held for the whole run)
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


def worker_pool(workers: int, preload: list[str]) -> tuple[ProcessPoolExecutor, logging.handlers.QueueListener]:
    """Worker processes that log through the parent's handlers.

    forkserver, not fork: the parent may run threads (zarr's I/O loop, a progress bar) whose
    locks a forked child would inherit held. The server imports ``preload`` once, so each
    worker starts in milliseconds instead of re-importing everything as spawn does.
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(preload)
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
