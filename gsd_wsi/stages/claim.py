"""A slide's claim and state in a cohort folder: ``OUT/<slide_id>/.lock`` and ``status.json``.

A process claims a slide by creating ``.lock`` with ``O_CREAT | O_EXCL`` (the kernel lets
exactly one creator win, so there is no check-then-create race) holding its host, pid and
start time, and gives it back in ``finally`` whatever happens. A lock left by a process that
died (a SIGKILL, a lost node) is recovered: at once when the lock names this host and its
pid is gone, or when it is older than ``stale_s`` for any host. Recovery happens under an
flock on ``.lock.guard`` (never deleted), so two processes that find the same stale lock
cannot both take the slide.

``status.json`` (written atomically) holds one entry per stage: status, attempts, seconds,
error, host, output sizes and the settings hash it was made with.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsd_wsi.atomic import atomic_write_text
from gsd_wsi.errors import OutputError

logger = logging.getLogger(__name__)

LOCK_NAME, GUARD_NAME, STATUS_NAME = ".lock", ".lock.guard", "status.json"
#: A lock older than this is taken for abandoned whatever host it names (a whole slide
#: through every stage takes minutes; a day-long one needs a larger limit).
DEFAULT_STALE_S = 6 * 3600.0


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    created: float      # seconds since the epoch
    token: str

    @classmethod
    def read(cls, path: Path) -> LockOwner | None:
        """The lock's owner, or None when there is no lock; an unreadable lock (a crash
        between create and write) counts as created at its file time by an unknown pid."""
        try:
            text = path.read_text()
            stat_mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), float(data["created"]), str(data["token"]))
        except (ValueError, KeyError, TypeError):
            return cls("", -1, stat_mtime, "")

    def describe(self) -> str:
        age = time.time() - self.created
        return f"pid {self.pid} on {self.host or 'an unknown host'}, {age:.0f} s ago"


class SlideBusy(Exception):
    """Another live process holds the slide's claim (not an error: try again later)."""

    def __init__(self, slide_dir: Path, owner: LockOwner) -> None:
        super().__init__(f"{slide_dir.name} is being processed by {owner.describe()}")
        self.owner = owner


def this_host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_stale(owner: LockOwner, stale_s: float, host: str | None = None) -> bool:
    """Dead owner on this host, or older than ``stale_s`` anywhere."""
    if time.time() - owner.created > stale_s:
        return True
    return owner.host == (host or this_host()) and not _pid_alive(owner.pid)


@contextmanager
def _guard(slide_dir: Path) -> Iterator[None]:
    with open(slide_dir / GUARD_NAME, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _create_lock(path: Path, owner: LockOwner) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(_owner_dict(owner), fh)
    return True


def _owner_dict(owner: LockOwner) -> dict[str, Any]:
    return {"host": owner.host, "pid": owner.pid, "created": owner.created, "token": owner.token}


@contextmanager
def claim_slide(slide_dir: Path, stale_s: float = DEFAULT_STALE_S) -> Iterator[LockOwner]:
    """Hold the slide's claim for the ``with`` block; raises :class:`SlideBusy` when a live
    process holds it. The claim is released in ``finally``, only if it is still ours."""
    try:
        slide_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {slide_dir} ({exc.strerror}); choose another -o") from exc
    lock = slide_dir / LOCK_NAME
    me = LockOwner(this_host(), os.getpid(), time.time(), uuid.uuid4().hex)
    if not _create_lock(lock, me):
        with _guard(slide_dir):
            owner = LockOwner.read(lock)
            if owner is not None and not is_stale(owner, stale_s, me.host):
                raise SlideBusy(slide_dir, owner)
            if owner is not None:
                logger.warning("%s: recovering the claim of %s (%s)", slide_dir.name, owner.describe(),
                               "dead" if owner.host == me.host else "too old")
                lock.unlink(missing_ok=True)
            if not _create_lock(lock, me):  # a live process claimed it between our looks
                raise SlideBusy(slide_dir, LockOwner.read(lock) or me)
    try:
        yield me
    finally:
        current = LockOwner.read(lock)
        if current is not None and current.token == me.token:
            lock.unlink(missing_ok=True)


def read_status(slide_dir: Path) -> dict[str, Any]:
    """The slide's status.json, or an empty state when there is none (or it is unreadable)."""
    try:
        data = json.loads((slide_dir / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return {"stages": {}}
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        return {"stages": {}}
    return data


def write_stage_status(slide_dir: Path, slide_id: str, slide_path: str, stage: str, entry: dict[str, Any]) -> None:
    """Replace one stage's entry in status.json (atomically). Call it while holding the claim."""
    state = read_status(slide_dir)
    state.update({"slide_id": slide_id, "path": slide_path})
    state["stages"][stage] = entry | {"updated": now_iso()}
    atomic_write_text(slide_dir / STATUS_NAME, json.dumps(state, indent=2) + "\n")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
