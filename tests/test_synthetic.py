"""Synthetic H&E slides: readable by OpenSlide and tifffile, with ground truth that matches the pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from gsd_wsi.errors import ConfigError
from gsd_wsi.synthetic import E_STAIN, H_STAIN, I0, SyntheticSlide, SyntheticSlideSpec, write_synthetic_slide

SMALL = {"width_px": 2048, "height_px": 1536}


def _level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


def _blocks(rgb: np.ndarray, slide: SyntheticSlide) -> np.ndarray:
    """Level-0 pixels as (rows, d, cols, d, 3) blocks, one per mask cell (edge-padded)."""
    d, (h, w) = slide.mask_downsample, slide.tissue_mask.shape
    padded = np.pad(rgb.astype(np.float64), ((0, h * d - rgb.shape[0]), (0, w * d - rgb.shape[1]), (0, 0)), mode="edge")
    return padded.reshape(h, d, w, d, 3)


def _on_mask_grid(rgb: np.ndarray, slide: SyntheticSlide) -> np.ndarray:
    """Area-average level-0 pixels onto the mask grid (float, shape of the masks)."""
    return _blocks(rgb, slide).mean(axis=(1, 3))


def _at_cell_centres(rgb: np.ndarray, slide: SyntheticSlide) -> np.ndarray:
    """Mean of the 4 x 4 level-0 pixels around each mask cell's centre (where masks are sampled)."""
    c = slice(slide.mask_downsample // 2 - 2, slide.mask_downsample // 2 + 2)
    return _blocks(rgb, slide)[:, c, :, c].mean(axis=(1, 3))


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) / np.maximum(rgb.max(axis=-1), 1)


@pytest.fixture(scope="module")
def busy_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """One slide with every optional feature, shared by the read-only tests."""
    spec = SyntheticSlideSpec(**SMALL, faint_region=True, small_biopsy=True, pen_marks=True, black_border=True, seed=3)
    return write_synthetic_slide(tmp_path_factory.mktemp("busy") / "busy.svs", spec)


def test_svs_opens_as_aperio_with_all_levels(tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "a.svs", SyntheticSlideSpec(**SMALL))
    assert slide.level_downsamples == (1, 4)
    with openslide.OpenSlide(slide.path) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert osr.level_count == 2
        assert osr.level_dimensions == ((2048, 1536), (512, 384))
        assert float(osr.properties["openslide.mpp-x"]) == 0.5
        assert float(osr.properties["openslide.mpp-y"]) == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svs"]  # no temporary left behind


def test_generic_tiff_opens_with_resolution(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec(width_px=4096, height_px=1024, mpp=0.25, fmt="tiff", file_tile_px=128)
    slide = write_synthetic_slide(tmp_path / "g.tiff", spec)
    assert slide.level_downsamples == (1, 4, 16)
    with openslide.OpenSlide(slide.path) as osr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert osr.level_dimensions == ((4096, 1024), (1024, 256), (256, 64))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)


def test_tifffile_sees_tiled_jpeg_pyramid(tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "t.svs", SyntheticSlideSpec(**SMALL, file_tile_px=128, jpeg_quality=80))
    with tifffile.TiffFile(slide.path) as tif:
        assert len(tif.pages) == 3  # 2048 -> 512 -> 128 px wide
        for i, page in enumerate(tif.pages):
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (128, 128)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.photometric == tifffile.PHOTOMETRIC.RGB
            assert page.shape == (1536 // 4**i, 2048 // 4**i, 3)
            assert page.subfiletype == (1 if i else 0)
        assert tif.pages[0].description.startswith("Aperio Image Library")
        assert "MPP = 0.5" in tif.pages[0].description
        assert tif.pages[1].description == ""  # no second (tifffile JSON) description


def test_reduced_level_is_area_average_of_level0(busy_slide: SyntheticSlide) -> None:
    with tifffile.TiffFile(busy_slide.path) as tif:
        level0, level1 = tif.pages[0].asarray().astype(np.float64), tif.pages[1].asarray().astype(np.float64)
    pooled = level0.reshape(384, 4, 512, 4, 3).mean(axis=(1, 3))
    assert np.abs(pooled - level1).mean() < 2.0  # JPEG noise only


def test_tissue_mask_agrees_with_pixels(busy_slide: SyntheticSlide) -> None:
    grid = _on_mask_grid(_level0(busy_slide.path), busy_slide)
    tissue, pen, border = busy_slide.tissue_mask, busy_slide.pen_mask, busy_slide.border_mask
    assert 0.05 < tissue.mean() < 0.6
    judged = ~pen & ~border
    detected = _saturation(grid) > 0.05
    assert (detected == tissue)[judged].mean() > 0.95
    assert grid[tissue].mean() < grid[judged & ~tissue].mean() - 20  # tissue is darker than glass
    assert 0.9 < busy_slide.tissue_fraction(0, 0, 2048, 1536) / tissue.mean() < 1.1


def test_faint_region_is_faint_but_not_background(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec(**SMALL, n_tissue_regions=0, faint_region=True, seed=5)
    slide = write_synthetic_slide(tmp_path / "f.svs", spec)
    grid = _on_mask_grid(_level0(slide.path), slide)
    od_sum = -np.log(np.clip(grid, 1, I0) / I0).sum(axis=-1)
    assert slide.tissue_mask.sum() > 100
    assert 0.12 < np.median(od_sum[slide.tissue_mask]) < 0.35
    assert np.median(od_sum[~slide.tissue_mask]) < 0.03


def test_small_biopsy_size(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec(**SMALL, n_tissue_regions=0, small_biopsy=True, seed=2)
    slide = write_synthetic_slide(tmp_path / "b.svs", spec)
    rows, cols = np.nonzero(slide.tissue_mask)
    extent_um = max(np.ptp(rows), np.ptp(cols)) * slide.mask_downsample * spec.mpp
    assert 250 < extent_um < 600


def test_same_spec_same_pixels_other_seed_other_pixels(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec(**SMALL, pen_marks=True, seed=11)
    a = write_synthetic_slide(tmp_path / "a.svs", spec)
    b = write_synthetic_slide(tmp_path / "b.svs", spec)
    c = write_synthetic_slide(tmp_path / "c.svs", SyntheticSlideSpec(**SMALL, pen_marks=True, seed=12))
    with tifffile.TiffFile(a.path) as ta, tifffile.TiffFile(b.path) as tb:
        assert all(np.array_equal(pa.asarray(), pb.asarray()) for pa, pb in zip(ta.pages, tb.pages))
    assert np.array_equal(a.tissue_mask, b.tissue_mask) and np.array_equal(a.pen_mask, b.pen_mask)
    assert not np.array_equal(a.tissue_mask, c.tissue_mask)
    assert np.abs(_level0(a.path).astype(int) - _level0(c.path)).mean() > 5


def test_pen_marks_are_blue_green_or_black(busy_slide: SyntheticSlide, tmp_path: Path) -> None:
    pen = busy_slide.pen_mask
    assert pen.sum() > 20
    rgb = _at_cell_centres(_level0(busy_slide.path), busy_slide)[pen]
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    blue, green, black = (b > r + 40) & (b > g + 20), (g > r + 20) & (g > b + 10), rgb.max(axis=1) < 90
    assert (blue | green | black).mean() > 0.9
    assert blue.any() and green.any() and black.any()
    assert not (pen & busy_slide.tissue_mask).any()
    plain = write_synthetic_slide(tmp_path / "p.svs", SyntheticSlideSpec(**SMALL, seed=3))
    assert not plain.pen_mask.any()


def test_black_border_and_glands(busy_slide: SyntheticSlide) -> None:
    border = busy_slide.border_mask
    assert border is not None and border.any() and not (border & busy_slide.tissue_mask).any()
    grid = _on_mask_grid(_level0(busy_slide.path), busy_slide)
    assert grid[border].max() < 60
    assert not (busy_slide.gland_mask & ~busy_slide.tissue_mask).any()


def test_macenko_recovers_the_stain_vectors(tmp_path: Path) -> None:
    torchstain = pytest.importorskip("torchstain")
    slide = write_synthetic_slide(tmp_path / "m.svs", SyntheticSlideSpec(**SMALL, seed=1))
    normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    normalizer.fit(_level0(slide.path))
    h, e = (v / np.linalg.norm(v) for v in normalizer.HERef.T)
    assert h @ H_STAIN > 0.98 and e @ E_STAIN > 0.95


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("gsd_wsi.synthetic._pool4", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic_slide(tmp_path / "x.svs", SyntheticSlideSpec(**SMALL))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("width_px", 100), ("height_px", -1), ("width_px", 2048.0), ("mpp", 0.0), ("mpp", float("nan")),
     ("file_tile_px", 200), ("file_tile_px", 0), ("fmt", "ndpi"), ("jpeg_quality", 101), ("jpeg_quality", 0),
     ("n_tissue_regions", -1), ("pen_marks", 1), ("faint_region", "yes"), ("seed", -3), ("seed", True)],
)
def test_bad_spec_values_raise_config_error(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        SyntheticSlideSpec(**{field: value})  # type: ignore[arg-type]
    assert repr(value) in str(info.value)
