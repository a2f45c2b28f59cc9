"""Microns per pixel: where a slide's resolution comes from, and when it is not to be trusted.

Order: the slide's own properties (vendor metadata), else TIFF resolution tags, else a
value the user gave (manifest ``mpp`` column or ``--slide-mpp``). With none, the slide
fails with a message that names the fix; nothing is ever guessed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import tifffile

from gsd_wsi.errors import MissingResolutionError

logger = logging.getLogger(__name__)

#: Resolutions coarser than this are not microscope scans: they are the 72/96/300 dpi
#: defaults that image software writes when it knows nothing (72 dpi = 352.8 um/px).
MAX_PLAUSIBLE_MPP = 50.0

_APERIO_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)")
_MICRONS_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre


def plausible_mpp(mpp: float | None, source: str) -> float | None:
    """``mpp`` if it is a believable microscope resolution, else None (with a log line).

    ``source`` names the file and where the value came from, for that line.
    """
    if mpp is None:
        return None
    if not (0.0 < mpp <= MAX_PLAUSIBLE_MPP):
        logger.warning("%s: ignoring its resolution of %.4g um/px (a placeholder, not a scan resolution)", source, mpp)
        return None
    return float(mpp)


def mpp_from_properties(properties: Mapping[str, str], name: str) -> float | None:
    """Resolution from OpenSlide properties (``openslide.mpp-x``), if believable."""
    value = properties.get("openslide.mpp-x")
    if value is None:
        return None
    try:
        return plausible_mpp(float(value), f"{name} (slide metadata)")
    except ValueError:
        return None


def mpp_from_tiff(tif: tifffile.TiffFile, name: str) -> float | None:
    """Resolution from an Aperio description (``MPP = x``) or the first page's resolution tags."""
    page = tif.pages.first
    match = _APERIO_MPP.search(page.description or "")
    if match:
        found = plausible_mpp(float(match.group(1)), f"{name} (Aperio metadata)")
        if found is not None:
            return found
    x_res = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    if x_res is None or unit is None:
        return None
    unit_code = int(unit.value)
    numerator, denominator = x_res.value
    if unit_code not in _MICRONS_PER_UNIT or numerator == 0 or denominator == 0:
        return None
    pixels_per_unit = numerator / denominator
    return plausible_mpp(_MICRONS_PER_UNIT[unit_code] / pixels_per_unit, f"{name} (TIFF resolution tag)")


def resolve_mpp(path: Path, from_file: float | None, user_mpp: float | None) -> float:
    """The slide's resolution, or the user's value when the file has none.

    When both exist and disagree by more than 5 %, the file's value is kept and a warning
    says so (the user's value is a fallback, as documented for ``--slide-mpp``).
    """
    if from_file is not None:
        if user_mpp is not None and abs(user_mpp / from_file - 1.0) > 0.05:
            logger.warning(
                "%s: the slide says %.4g um/px; the given %.4g um/px is only used for slides without one",
                path.name, from_file, user_mpp,
            )
        return from_file
    if user_mpp is not None:
        if not (0.0 < user_mpp <= MAX_PLAUSIBLE_MPP):
            raise MissingResolutionError(
                f"{path}: the given resolution {user_mpp} um/px is not plausible; give the scan's "
                f"microns per pixel (e.g. 0.25 at 40x, 0.5 at 20x)"
            )
        return float(user_mpp)
    raise MissingResolutionError(
        f"{path}: no resolution (microns per pixel) in the file; give it with --slide-mpp "
        f"or an 'mpp' column in a CSV manifest (e.g. 0.25 for 40x, 0.5 for 20x)"
    )
