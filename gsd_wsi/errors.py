"""The one exception family of gsd-wsi.

Every error a user can cause is a :class:`GsdWsiError`. Each subclass also inherits the
builtin it refines, so ``except ValueError`` and ``except OSError`` keep working for
callers that do not know this package. Messages say what was wrong and what to do.
"""

from __future__ import annotations


class GsdWsiError(Exception):
    """Base class of every error raised on purpose by gsd-wsi."""


class ConfigError(GsdWsiError, ValueError):
    """An option value is invalid (the message echoes the value and the valid range)."""


class SlideOpenError(GsdWsiError, OSError):
    """A slide path is missing, unsupported or corrupt."""


class MissingResolutionError(GsdWsiError, ValueError):
    """A slide carries no microns-per-pixel and none was given."""


class SlideTooSmallError(GsdWsiError, ValueError):
    """A slide is smaller than one tile at the requested resolution."""


class NotBrightfieldError(GsdWsiError, ValueError):
    """A slide does not look like brightfield (transmitted-light) H&E: mostly near-black, as a
    fluorescence or other dark-background scan, or an empty one (the message gives the numbers)."""


class StainError(GsdWsiError, ValueError):
    """Stain estimation or normalisation failed (e.g. too few tissue pixels)."""


class StoreError(GsdWsiError, OSError):
    """A patch store is missing, incomplete or not a gsd-wsi store."""


class OutputError(GsdWsiError, OSError):
    """An output location cannot be written, or would lie outside the output folder."""


class DuplicateSlideIdError(GsdWsiError, ValueError):
    """Two inputs resolve to the same slide id."""


class TrainingDivergedError(GsdWsiError, ArithmeticError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunFolderError(GsdWsiError, FileExistsError):
    """An output folder holds a run that this command must not silently overwrite."""


class MetricInputError(GsdWsiError, ValueError):
    """Inputs to a metric are malformed (shapes differ, labels out of range, negative ids)."""


class MaskWriteError(GsdWsiError, OSError):
    """A mask output cannot be written or read back: the target exists, a band is missing, or
    the folder is not a finished gsd-wsi label pyramid."""


class SchedulerError(GsdWsiError, ConnectionError):
    """The dask scheduler cannot be reached or started."""


class SlideTimeoutError(GsdWsiError, TimeoutError):
    """A slide took longer than the run's per-slide time limit."""
