"""Writing one mask file atomically, with the writers' one error type."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gsd_wsi.atomic import temporary_sibling
from gsd_wsi.errors import MaskWriteError


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; it becomes ``path`` only if the block succeeds.

    On failure the temporary file is removed and an OSError is reported as MaskWriteError
    naming the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, MaskWriteError):
            raise MaskWriteError(f"cannot write {path}: {exc}") from exc
        raise
