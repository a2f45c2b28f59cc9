"""Tissue detection on a slide thumbnail: a boolean mask, precise at the outline.

Detection runs at ``config.thumb_mpp`` (finer thumbnails are box-downscaled, the mask
resampled back); sizes are physical and become pixels once, from the working mpp. Optical
density (OD) is taken relative to the glass colour, so a colour cast is not tissue. The OD
sum threshold is ``max(noise floor, min(Otsu, FAINT_OD))``: Otsu alone sits between glass
and *strong* tissue and loses pale staining (OD sum 0.15-0.3). Artefacts are classified by
OD colour direction: blue and green ink absorb red more than green, which H&E never does
(both stains absorb green most); black ink, scan borders and dirt are dark and colourless.

All of it assumes transmitted light (bright glass, absorbing stains): :func:`check_brightfield`
refuses thumbnails that are mostly near-black, as fluorescence and other dark-field scans are.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from gsd_wsi.errors import ConfigError, NotBrightfieldError

log = logging.getLogger(__name__)

FAINT_OD = 0.10  # OD-sum bound that keeps pale tissue (its OD sum is ~0.15-0.3)
NOISE_SIGMAS = 6.0  # threshold never closer to the glass than this many noise sigmas
GREY_CHROMA = 0.05  # OD chroma below this: colourless (grey), never tissue
INK_RATIO_SEED, INK_RATIO_GROW = 1.25, 1.05  # OD_red / OD_green of blue/green ink
INK_RATIO_FLOOR = 0.9  # ink over tissue grows no lower (hematoxylin itself is ~0.93)
DARK_CHROMA_SEED, DARK_CHROMA_GROW = 0.07, 0.12  # chroma of black ink / borders / dirt
DARK_OD_SEED = 0.9  # OD sum a colourless seed must exceed (a grey (160,160,160) or darker)
NEAR_BLACK_OD = 1.8  # every channel this dense (I < ~16% of glass): never tissue
ARTEFACT_MIN_UM2 = 2000.0  # artefact seeds smaller than this are ignored (grey nuclei pixels)
ARTEFACT_MARGIN_UM = 12.0  # removed around artefacts (blurred ink edges)
GLASS_MARGIN = 15  # grey levels above a glass candidate that count as clearly brighter
GLASS_BRIGHTER_MAX = 0.02  # fraction of pixels allowed clearly brighter than the glass
# Brightfield or not, from the brightest channel of each thumbnail pixel. In transmitted light
# glass is ~240 and stained tissue keeps one channel above ~100 even where dense hematoxylin
# is averaged over 8 um; only black ink (~36), scan borders (~16-20) and dirt fall below
# DARK_VALUE. Those cover a few % of a brightfield thumbnail (a generous border ~30 %), while a
# fluorescence scan is dark background (0-30) with sparse signal: 70-99 % below DARK_VALUE. So
# more than MAX_DARK_FRACTION near-black means not brightfield, unless MIN_LIGHT_FRACTION of the
# pixels are light in every channel (glass, pale tissue): that is a brightfield slide under a
# big black fill, as fluorescence signal is one dye's colour and rarely white.
DARK_VALUE = 64  # brightest channel below this (a quarter of full scale): near-black
MAX_DARK_FRACTION = 0.5  # more near-black than this: not brightfield ...
LIGHT_MIN = 150  # ... unless pixels with every channel >= LIGHT_MIN ...
MIN_LIGHT_FRACTION = 0.05  # ... are at least this fraction of the thumbnail
_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class TissueConfig:
    """Tissue detection settings; sizes are physical so they hold at any magnification.

    Defaults: detection at 8 um/px (a 20 x 15 mm slide is 2500 x 1900 px: fast, yet finer
    than any tile); ``min_object_um2`` 10,000 (a 100 um square) removes dust and debris while
    keeping biopsy fragments ~115 um across and up (a 300 um biopsy is ~70,000 um^2);
    ``max_hole_um2`` 20,000 fills lumens and fat gaps smaller than one 256 px tile at
    0.5 um/px (128 um square) but keeps real gaps; ``closing_um`` 16 (2 px at 8 um/px)
    bridges hairline tears without growing convex outlines. ``remove_pen`` drops blue, green
    and black ink; near-black pixels and dark borders are dropped either way.
    """

    thumb_mpp: float = 8.0
    min_object_um2: float = 10_000.0
    max_hole_um2: float = 20_000.0
    closing_um: float = 16.0
    remove_pen: bool = True

    def __post_init__(self) -> None:
        ranges = [("thumb_mpp", 0.1, 1000.0, False), ("min_object_um2", 0.0, 1e12, True),
                  ("max_hole_um2", 0.0, 1e12, True), ("closing_um", 0.0, 1e4, True)]
        for name, lo, hi, zero_ok in ranges:
            value = getattr(self, name)
            if not _is_number(value) or not (lo <= value <= hi) or (value == lo and not zero_ok):
                raise ConfigError(f"TissueConfig.{name}={value!r} is invalid: expected a number in "
                                  f"{'[' if zero_ok else '('}{lo}, {hi}]")
        if not isinstance(self.remove_pen, bool):
            raise ConfigError(f"TissueConfig.remove_pen={self.remove_pen!r} is invalid: expected a bool")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def detect_tissue(
    thumb_rgb: np.ndarray, thumb_mpp: float, config: TissueConfig = TissueConfig()
) -> np.ndarray:
    """Boolean tissue mask with the thumbnail's height and width.

    ``thumb_rgb``: HxWx3 (or HxWx4; fully transparent pixels count as glass) uint8, or float
    in [0, 1]. ``thumb_mpp``: its microns per pixel. A thumbnail finer than
    ``config.thumb_mpp`` is downscaled for detection; a coarser one is used as is.
    """
    if not (_is_number(thumb_mpp) and thumb_mpp > 0):
        raise ConfigError(f"thumb_mpp={thumb_mpp!r} is invalid: expected microns per pixel > 0")
    rgb = _as_rgb_uint8(thumb_rgb)
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        return np.zeros((height, width), dtype=bool)
    factor = config.thumb_mpp / thumb_mpp
    if factor > 1.25:
        small_w, small_h = max(1, round(width / factor)), max(1, round(height / factor))
        small = np.asarray(Image.fromarray(rgb).resize((small_w, small_h), Image.Resampling.BOX))
        mask_small = _detect(small, thumb_mpp * width / small_w, config)
        up = Image.fromarray(mask_small.astype(np.uint8) * 255)
        return np.asarray(up.resize((width, height), Image.Resampling.BILINEAR)) >= 128
    if factor < 0.8:
        log.info("thumbnail at %.3g um/px, coarser than thumb_mpp: used as is", thumb_mpp)
    return _detect(rgb, float(thumb_mpp), config)


def check_brightfield(thumb_rgb: np.ndarray, slide_name: str) -> None:
    """Raise :class:`NotBrightfieldError` unless ``thumb_rgb`` looks like a brightfield slide.

    ``thumb_rgb`` as for :func:`detect_tissue`; ``slide_name`` starts the message. Not
    brightfield: mostly near-black (fluorescence, dark field) or entirely black (an empty or
    failed scan); black borders and ink on a brightfield slide pass (see ``DARK_VALUE``).
    """
    rgb = _as_rgb_uint8(thumb_rgb)
    if rgb.size == 0:
        return
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / 1e6)))  # ~1 Mpx is plenty
    sample = rgb[::step, ::step].reshape(-1, 3)
    value = sample.max(axis=1)
    dark, light = float(np.mean(value < DARK_VALUE)), float(np.mean(sample.min(axis=1) >= LIGHT_MIN))
    log.debug("%s: %.1f %% near-black, %.1f %% light", slide_name, 100 * dark, 100 * light)
    if dark <= MAX_DARK_FRACTION or light >= MIN_LIGHT_FRACTION:
        return
    expects = f"{slide_name}: gsd-wsi expects brightfield H&E (bright glass, stained tissue)"
    if dark == 1.0:
        raise NotBrightfieldError(
            f"{expects}, but its thumbnail is entirely black (brightest pixel {int(value.max())}/255): an empty "
            "or failed scan, or a dark-background (fluorescence) one. Check the file in a slide viewer; leave it "
            "out of the inputs")
    raise NotBrightfieldError(
        f"{expects}, but this looks like a fluorescence or other dark-background scan: {100 * dark:.0f} % of its "
        f"thumbnail is near-black (brightest channel < {DARK_VALUE}/255; median {int(np.median(value))}/255) and "
        f"{100 * light:.1f} % is light (every channel >= {LIGHT_MIN}/255; brightfield shows glass). Leave it out "
        "of the inputs; a brightfield scan this dark was badly exposed and needs rescanning")


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype != np.uint8:  # floats in [0, 1], or other numbers in 0-255
        unit = np.issubdtype(arr.dtype, np.floating) and arr.size > 0 and np.nanmax(arr) <= 1.0
        arr = np.nan_to_num(arr * (255.0 if unit else 1.0), nan=255.0)
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.shape[2] == 4:  # openslide read_region: transparent means not scanned, i.e. glass
        arr = np.where(arr[..., 3:] == 0, np.uint8(255), arr[..., :3])
    return np.ascontiguousarray(arr)


def _glass_colour(rgb: np.ndarray) -> np.ndarray | None:
    """Colour of the glass: the brightest frequent level among bright, near-neutral pixels."""
    step = max(1, int(math.sqrt(rgb.shape[0] * rgb.shape[1] / 1e6)))
    sample = rgb[::step, ::step].reshape(-1, 3).astype(np.int16)
    hi, lo = sample.max(axis=1), sample.min(axis=1)
    cand = sample[(hi >= 150) & ((hi - lo) <= 0.15 * hi)]
    if len(cand) < max(50, 0.005 * len(sample)):
        return None
    lum = cand.sum(axis=1) // 3
    sample_lum = sample.sum(axis=1) // 3
    # The glass is the brightest large mode. Where tissue fills the view (ROI crops, TMA
    # cores) the most frequent near-neutral level can be pale tissue, with the real glass
    # showing only in gaps; glass has almost nothing brighter than itself, so while more
    # than GLASS_BRIGHTER_MAX of the pixels are clearly brighter, look above the mode.
    floor = 0
    while True:
        hist = np.convolve(np.bincount(lum[lum >= floor], minlength=256), np.ones(5), mode="same")
        mode = int(np.argmax(hist))
        brighter = mode + GLASS_MARGIN
        if np.mean(sample_lum > brighter) <= GLASS_BRIGHTER_MAX or np.sum(lum > brighter) < 50:
            return np.median(cand[np.abs(lum - mode) <= 3], axis=0).astype(np.float64)
        floor = brighter + 1


def _detect(rgb: np.ndarray, mpp: float, config: TissueConfig) -> np.ndarray:
    px_area = mpp * mpp  # the one um -> px conversion; every size below derives from it
    min_object_px = config.min_object_um2 / px_area
    max_hole_px = config.max_hole_um2 / px_area
    closing_px = round(config.closing_um / mpp)
    artefact_min_px = ARTEFACT_MIN_UM2 / px_area
    margin_px = math.ceil(ARTEFACT_MARGIN_UM / mpp)
    log.debug("at %.3g um/px: min object %.1f px, max hole %.1f px, closing r %d px", mpp, min_object_px,
              max_hole_px, closing_px)

    glass = _glass_colour(rgb)
    if glass is None:  # tissue wall to wall
        log.info("no glass found in the thumbnail; assuming white (255, 255, 255)")
        glass = np.full(3, 255.0)
    # OD by lookup tables on a 3x3 box blur (noise / 3; colour ratios stay clean at JPEG
    # edges). Whole-image float passes are the cost, so colour features and the unblurred
    # density are computed only on the pixels dense enough to matter.
    blurred = np.asarray(Image.fromarray(rgb).filter(ImageFilter.Kernel((3, 3), [1] * 9, scale=9)))
    levels = np.log(np.maximum(np.arange(256, dtype=np.float64), 0.5))
    luts = [(np.log(max(glass[c], 1.0)) - levels).astype(np.float32) for c in range(3)]
    smooth = luts[0][blurred[..., 0]]
    smooth += luts[1][blurred[..., 1]]
    smooth += luts[2][blurred[..., 2]]
    threshold = _threshold(smooth)
    idx = np.flatnonzero(smooth > threshold) if threshold is not None else np.empty(0, np.int64)
    if idx.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)

    colours = blurred.reshape(-1, 3)[idx]
    od0, od1, od2 = (luts[c][colours[:, c]] for c in range(3))
    d_smooth, d_raw = smooth.ravel()[idx], _od_sum(luts, rgb.reshape(-1, 3)[idx])
    del smooth, blurred, colours  # peak memory: a 25 Mpx thumbnail holds ~100 MB per float map
    # relative chroma |OD - mean(OD)| / |OD|: 0 for grey and black, ~0.3 for hematoxylin
    norm2 = od0 * od0 + od1 * od1 + od2 * od2
    d_sum = od0 + od1 + od2
    chroma2 = np.maximum(norm2 - d_sum * d_sum / 3.0, 0.0) / np.maximum(norm2, 1e-6)

    # From here on: the bounding box of the dense pixels, with room for the morphology.
    pad = 2 * max(1, closing_px) + margin_px + 2
    rows, cols = np.divmod(idx, rgb.shape[1])
    y0, y1 = max(0, int(rows.min()) - pad), min(rgb.shape[0], int(rows.max()) + pad + 1)
    x0, x1 = max(0, int(cols.min()) - pad), min(rgb.shape[1], int(cols.max()) + pad + 1)
    shape = (y1 - y0, x1 - x0)
    idx = (rows - y0) * shape[1] + (cols - x0)

    def full(selected: np.ndarray) -> np.ndarray:
        out = np.zeros(shape, dtype=bool)
        out.ravel()[idx[selected]] = True
        return out

    tissue_sel = (d_raw > 0.5 * threshold) & (chroma2 >= GREY_CHROMA**2)
    tissue = _trim_partial_pixels(full(tissue_sel), rgb[y0:y1, x0:x1], luts)

    # Artefacts: large certain seeds, grown into connected weaker pixels of the same kind.
    near_black = (od0 > NEAR_BLACK_OD) & (od1 > NEAR_BLACK_OD) & (od2 > NEAR_BLACK_OD)
    dark_seed = ((chroma2 < DARK_CHROMA_SEED**2) & (d_smooth > DARK_OD_SEED)) | near_black
    artefact = np.zeros(shape, dtype=bool)
    if dark_seed.any():
        seed = full(dark_seed)
        if not config.remove_pen:  # black ink stays; near-black and border-touching go
            seed = full(near_black) | (seed & _components(seed, lambda lab, sizes: _edge_labels(lab)))
        artefact |= _grow(seed, full((chroma2 < DARK_CHROMA_GROW**2) | near_black), artefact_min_px)
    ink_seed = (d_smooth > 0.3) & (od0 > INK_RATIO_SEED * od1)
    if config.remove_pen and ink_seed.any():
        strong = tissue_sel & (d_smooth > 0.3)
        ratio = _ink_grow_ratio(od0[strong], od1[strong])
        artefact |= _grow(full(ink_seed), full(od0 > ratio * od1), artefact_min_px)
    if artefact.any():
        artefact = ndi.binary_dilation(artefact, structure=disk(margin_px).astype(bool))
        tissue &= ~artefact

    if closing_px >= 1:
        foot = disk(closing_px).astype(bool)
        tissue = ndi.binary_dilation(tissue, structure=foot)
        tissue = ndi.binary_erosion(tissue, structure=foot, border_value=1)
    # fill 4-connected holes (the complement of 8-connected tissue) not touching the border
    holes = _components(~tissue, lambda lab, sizes: (sizes < max_hole_px) & ~_edge_labels(lab), _FOUR)
    tissue = (tissue | holes) & ~artefact
    tissue = _components(tissue, lambda lab, sizes: sizes >= min_object_px)
    out = np.zeros(rgb.shape[:2], dtype=bool)
    out[y0:y1, x0:x1] = tissue
    return out


def _threshold(smooth: np.ndarray) -> float | None:
    """OD-sum threshold ``max(noise floor, min(Otsu, FAINT_OD))``, or None when nothing on
    the thumbnail stands above the glass noise (a blank thumbnail: no Otsu on it)."""
    step = max(1, int(math.sqrt(smooth.size / 1_000_000)))
    sample = smooth[::step, ::step]
    below = sample[sample < 0]  # only glass is brighter than the glass: its noise, mirrored
    noise = float(np.sqrt(np.mean(below * below))) if below.size >= 50 else 0.0
    floor = max(NOISE_SIGMAS * noise, 0.04)
    sample = np.clip(sample, 0.0, 3.0)
    if float(sample.max()) <= floor:
        log.debug("nothing denser than the glass noise floor %.3f: no tissue", floor)
        return None
    otsu = float(threshold_otsu(sample)) if np.ptp(sample) > 1e-6 else FAINT_OD
    if floor > FAINT_OD:
        log.warning("noisy glass (OD noise %.3f): tissue paler than OD %.2f may be missed", noise, floor)
    log.debug("OD noise %.4f, Otsu %.3f, floor %.3f", noise, otsu, floor)
    return max(floor, min(otsu, FAINT_OD))


def _ink_grow_ratio(od_red: np.ndarray, od_green: np.ndarray) -> float:
    """OD_red/OD_green above which ink grows into tissue: clearly bluer than this slide's
    tissue (its 75th percentile + 0.2; ink over tissue is a minority), kept between
    INK_RATIO_FLOOR (about pure hematoxylin) and INK_RATIO_GROW."""
    ratio = od_red / np.maximum(od_green, 1e-3)
    ratio = ratio[ratio <= INK_RATIO_GROW]  # leaves out the ink itself
    if ratio.size < 100:
        return INK_RATIO_GROW
    return float(np.clip(np.percentile(ratio, 75) + 0.2, INK_RATIO_FLOOR, INK_RATIO_GROW))


def _trim_partial_pixels(tissue: np.ndarray, rgb: np.ndarray, luts: list[np.ndarray]) -> np.ndarray:
    """Drop outline pixels less than half covered: a low threshold keeps any pixel that a
    tissue edge only clips, which would grow every outline by ~0.5 px. An outline pixel
    stays when its OD sum is at least half the median of its interior tissue neighbours."""
    interior = ndi.binary_erosion(tissue, structure=_EIGHT, border_value=1)
    ys, xs = np.nonzero(tissue & ~interior)
    if ys.size == 0 or not interior.any():
        return tissue
    height, width = tissue.shape
    refs = np.full((ys.size, 8), np.inf, dtype=np.float32)
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for k, (dy, dx) in enumerate(offsets):
        ny, nx = ys + dy, xs + dx
        ok = np.flatnonzero((ny >= 0) & (ny < height) & (nx >= 0) & (nx < width))
        ok = ok[interior[ny[ok], nx[ok]]]
        refs[ok, k] = _od_sum(luts, rgb[ny[ok], nx[ok]])
    count = np.isfinite(refs).sum(axis=1)
    refs.sort(axis=1)  # inf (no interior neighbour there) sorts last
    rows = np.flatnonzero(count > 0)
    lo, hi = (count[rows] - 1) // 2, count[rows] // 2
    median = 0.5 * (refs[rows, lo] + refs[rows, hi])
    drop = rows[_od_sum(luts, rgb[ys[rows], xs[rows]]) < 0.5 * median]
    tissue = tissue.copy()
    tissue[ys[drop], xs[drop]] = False
    return tissue


def _od_sum(luts: list[np.ndarray], px: np.ndarray) -> np.ndarray:
    """OD sum of (N, 3) uint8 pixels."""
    return luts[0][px[:, 0]] + luts[1][px[:, 1]] + luts[2][px[:, 2]]


def _edge_labels(labels: np.ndarray) -> np.ndarray:
    """Boolean per label: does the component touch the array border?"""
    touching = np.zeros(int(labels.max()) + 1, dtype=bool)
    touching[labels[0]] = touching[labels[-1]] = True
    touching[labels[:, 0]] = touching[labels[:, -1]] = True
    return touching


def _components(mask: np.ndarray, keep, structure: np.ndarray | None = None) -> np.ndarray:
    """The connected components of ``mask`` for which ``keep(labels, sizes)`` is True."""
    labels, n = ndi.label(mask, structure=_EIGHT if structure is None else structure)
    if n == 0:
        return np.zeros_like(mask)
    chosen = np.asarray(keep(labels, np.bincount(labels.ravel(), minlength=n + 1)), dtype=bool)
    chosen[0] = False
    return chosen[labels]


def _grow(seed: np.ndarray, grow: np.ndarray, min_seed_px: float) -> np.ndarray:
    """Components of ``grow | seed`` holding a seed component of at least ``min_seed_px``."""
    seed = _components(seed, lambda lab, sizes: sizes >= min_seed_px)
    if not seed.any():
        return seed
    return _components(grow | seed, lambda lab, sizes: np.bincount(lab[seed], minlength=sizes.size) > 0)
