"""The tile grid: lattice, level choice, exact tissue fractions."""

from __future__ import annotations

import numpy as np
import pytest

from gsd_wsi.errors import ConfigError, SlideTooSmallError
from gsd_wsi.grid import area_fractions, make_grid, tissue_fractions
from gsd_wsi.slide import open_slide


def test_lattice_inside_slide(synthetic_svs) -> None:
    with open_slide(synthetic_svs.path) as slide:
        grid = make_grid(slide, tile_mpp=0.5, tile_px=256, stride_px=192)
        w, h = slide.dimensions
        assert grid.level == 0 and grid.read_px == 512 and grid.read_stride_px == 384
        assert grid.l0_xy.dtype == np.int64
        assert (grid.l0_xy % 384 == 0).all()
        assert (grid.l0_xy >= 0).all()
        assert (grid.l0_xy[:, 0] + 512 <= w).all() and (grid.l0_xy[:, 1] + 512 <= h).all()
        n_x, n_y = (w - 512) // 384 + 1, (h - 512) // 384 + 1
        assert grid.n_tiles == n_x * n_y
        # Row-major order: y never decreases.
        assert (np.diff(grid.l0_xy[:, 1]) >= 0).all()


def test_reads_from_coarser_level_when_it_is_fine_enough(synthetic_svs) -> None:
    with open_slide(synthetic_svs.path) as slide:
        grid = make_grid(slide, tile_mpp=2.0, tile_px=128, stride_px=128)
        assert grid.level == 1 and grid.level_downsample == 4.0
        assert grid.read_px == 256 and grid.tile_mpp == 2.0
        assert (grid.l0_xy == grid.read_xy * 4).all()


def test_snaps_to_level_resolution_within_tolerance(slides_dir) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        grid = make_grid(slide, tile_mpp=0.5, tile_px=256, stride_px=256)
        assert grid.read_px == 256 and grid.tile_mpp == pytest.approx(0.499)


def test_refuses_upsampling_and_tiny_slides(synthetic_tiff, slides_dir) -> None:
    with open_slide(synthetic_tiff.path) as slide:
        with pytest.raises(ConfigError, match="upsampled"):
            make_grid(slide, tile_mpp=0.25, tile_px=256, stride_px=256)
    with open_slide(slides_dir / "small.svs") as slide:
        with pytest.raises(SlideTooSmallError, match="smaller than one 256-px tile"):
            make_grid(slide, tile_mpp=0.5, tile_px=256, stride_px=256)


def test_area_fractions_are_exact() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((40, 50)) > 0.5
    up = 8  # supersample: with corners on the 1/8 lattice the brute-force mean is exact
    fine = np.kron(mask, np.ones((up, up), bool))
    boxes = rng.integers(0, 30 * up, (200, 2)) / up
    size = (7.375, 5.5)
    got = area_fractions(mask, boxes, size)
    want = [fine[int(y * up) : int((y + size[1]) * up), int(x * up) : int((x + size[0]) * up)].mean() for x, y in boxes]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_tissue_fraction_matches_drawn_truth(synthetic_svs) -> None:
    """Fractions computed on the detected mask track those on the generator's truth."""
    from gsd_wsi.tissue import TissueConfig, detect_tissue

    with open_slide(synthetic_svs.path) as slide:
        grid = make_grid(slide, tile_mpp=0.5, tile_px=256, stride_px=256)
        thumb, scale = slide.thumbnail(TissueConfig().thumb_mpp)
        detected = detect_tissue(thumb, slide.mpp * scale[0])
        got = tissue_fractions(grid, detected, scale)
        ds = synthetic_svs.mask_downsample
        truth = tissue_fractions(grid, synthetic_svs.tissue_mask, (ds, ds))
    assert np.abs(got - truth).mean() < 0.05
    keep_got, keep_truth = got >= 0.5, truth >= 0.5
    assert (keep_got == keep_truth).mean() > 0.95
