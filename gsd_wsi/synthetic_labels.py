"""Labelled images cut from a synthetic slide and its drawn ground truth (glands), for
fine-tuning trials, the demo and the segment benchmarks without real annotations.

    slide = write_synthetic_slide("train.svs", SyntheticSlideSpec(...))
    write_labelled_crops(slide, "glands-data", mpp=2.0, crop_px=256, n_crops=24)
    # glands-data/images/*.png + masks/*.png (0 background, 1 gland): `gsd-wsi finetune glands-data ...`
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from gsd_wsi.errors import ConfigError
from gsd_wsi.imageops import resize_rgb
from gsd_wsi.slide import open_slide
from gsd_wsi.synthetic import SyntheticSlide

logger = logging.getLogger(__name__)


def truth_at(cells: np.ndarray, cell_l0_px: int, l0_xy: tuple[float, float], l0_per_px: float,
             size_px: int) -> np.ndarray:
    """A truth mask (cells of ``cell_l0_px`` level-0 px) sampled at the centres of a
    ``size_px`` square of pixels of ``l0_per_px`` level-0 px, top-left at ``l0_xy``."""
    centres = (np.arange(size_px) + 0.5) * l0_per_px
    rows = np.clip(((l0_xy[1] + centres) // cell_l0_px).astype(np.int64), 0, cells.shape[0] - 1)
    cols = np.clip(((l0_xy[0] + centres) // cell_l0_px).astype(np.int64), 0, cells.shape[1] - 1)
    return cells[rows[:, None], cols[None, :]]


def write_labelled_crops(slide: SyntheticSlide, out_dir: str | Path, mpp: float, crop_px: int = 256,
                         n_crops: int = 24, min_tissue: float = 0.5, seed: int = 0) -> list[Path]:
    """``n_crops`` crops of ``crop_px`` pixels at ``mpp`` over tissue, with their gland masks.

    Writes ``out_dir/images/<name>.png`` and ``out_dir/masks/<name>.png`` (0 background, 1
    gland) and returns the image paths. Crops are drawn at random among those with at least
    ``min_tissue`` true tissue.
    """
    out_dir = Path(out_dir)
    if mpp < slide.spec.mpp:
        raise ConfigError(f"mpp={mpp}: finer than the slide's {slide.spec.mpp} um/px")
    l0_per_px = mpp / slide.spec.mpp
    side_l0 = crop_px * l0_per_px
    width0, height0 = slide.spec.width_px, slide.spec.height_px
    if side_l0 > min(width0, height0):
        raise ConfigError(f"a {crop_px}-px crop at {mpp} um/px is larger than the slide")
    rng = np.random.default_rng(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with open_slide(slide.path) as reader:
        level = reader.best_level_for_mpp(mpp)
        ds = reader.levels[level].downsample
        for _ in range(200 * n_crops):
            if len(written) == n_crops:
                break
            x0 = float(rng.integers(0, int(width0 - side_l0) + 1))
            y0 = float(rng.integers(0, int(height0 - side_l0) + 1))
            tissue = truth_at(slide.tissue_mask, slide.mask_downsample, (x0, y0), l0_per_px, crop_px)
            if tissue.mean() < min_tissue:
                continue
            read_px = int(round(side_l0 / ds))
            rgb = reader.read_level_region(level, (int(round(x0 / ds)), int(round(y0 / ds))), (read_px, read_px))
            image = resize_rgb(rgb, (crop_px, crop_px))
            glands = truth_at(slide.gland_mask, slide.mask_downsample, (x0, y0), l0_per_px, crop_px)
            name = f"{slide.path.stem}-{len(written):03d}"
            Image.fromarray(image).save(out_dir / "images" / f"{name}.png")
            Image.fromarray(glands.astype(np.uint8)).save(out_dir / "masks" / f"{name}.png")
            written.append(out_dir / "images" / f"{name}.png")
    if len(written) < n_crops:
        logger.warning("%s: only %d of %d crops have %.0f %% tissue", slide.path.name, len(written), n_crops,
                       100 * min_tissue)
    return written
