"""Slide reading: backends agree pixel for pixel; resolution and errors are right."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from gsd_wsi.errors import ConfigError, MissingResolutionError, SlideOpenError
from gsd_wsi.imageops import resize_rgb
from gsd_wsi.slide import open_slide

REGIONS = [((0, 0), (256, 256)), ((300, 517), (700, 333)), ((1, 2), (3, 5))]


@pytest.fixture(scope="module")
def synthetic_ycbcr_tiff(tmp_path_factory: pytest.TempPathFactory):
    """A generic TIFF whose JPEG tiles are YCbCr 4:2:0, as tifffile and most scanners write them."""
    from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(width_px=2048, height_px=1536, mpp=0.5, fmt="tiff", jpeg_colour="ycbcr", seed=7)
    return write_synthetic_slide(tmp_path_factory.mktemp("ycbcr") / "ycbcr.tiff", spec)


@pytest.mark.parametrize("fixture", ["synthetic_svs", "synthetic_tiff", "synthetic_ycbcr_tiff"])
def test_fast_path_equals_openslide(fixture: str, request: pytest.FixtureRequest) -> None:
    synth = request.getfixturevalue(fixture)
    with open_slide(synth.path) as fast, open_slide(synth.path, backend="openslide") as ref:
        assert fast.backend == "tifffile" and ref.backend == "openslide"
        assert [(lv.width_px, lv.height_px) for lv in fast.levels] == [(lv.width_px, lv.height_px) for lv in ref.levels]
        assert [lv.downsample for lv in fast.levels] == pytest.approx([lv.downsample for lv in ref.levels])
        assert fast.mpp == ref.mpp == synth.spec.mpp
        for level in range(len(fast.levels)):
            lv = fast.levels[level]
            # Regions inside, across tile borders, and overhanging the right/bottom edge.
            regions = REGIONS + [((lv.width_px - 100, lv.height_px - 60), (256, 256))]
            for xy, size in regions:
                a = fast.read_level_region(level, xy, size)
                b = ref.read_level_region(level, xy, size)
                assert a.shape == (size[1], size[0], 3) and a.dtype == np.uint8
                np.testing.assert_array_equal(a, b, err_msg=f"level {level} region {xy} {size}")


def test_reads_from_many_threads_equal_serial_reads(synthetic_tiff) -> None:
    """The tile cache is shared by threads (readers on several threads, large reads decoding
    on several); a small cache makes threads evict each other's tiles while they read."""
    from concurrent.futures import ThreadPoolExecutor

    from gsd_wsi.slide.tiff_backend import TiffSlide

    rng = np.random.default_rng(0)
    w, h = synthetic_tiff.spec.width_px, synthetic_tiff.spec.height_px
    regions = [((int(x), int(y)), (256, 256)) for x, y in zip(rng.integers(0, w - 256, 200), rng.integers(0, h - 256, 200))]
    regions += [((x, 0), (240, 240)) for x in range(0, w - 240, 240)]  # whole file tiles: the cached arrays themselves
    with open_slide(synthetic_tiff.path) as serial:
        expected = [serial.read_level_region(0, xy, size) for xy, size in regions]
    slide = TiffSlide.open(synthetic_tiff.path, synthetic_tiff.spec.mpp)
    slide._cache_bytes = 8 * 240 * 240 * 3  # room for 8 tiles
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda r: slide.read_level_region(0, *r), regions * 3))
    finally:
        slide.close()
    for i, region in enumerate(got):
        np.testing.assert_array_equal(region, expected[i % len(regions)])


@pytest.mark.parametrize("cache_tiles", [4, 1000])
def test_large_reads_decode_on_threads_and_equal_openslide(synthetic_tiff, cache_tiles: int) -> None:
    """A read of many undecoded tiles (a thumbnail band of a slide without a pyramid) decodes
    them on several threads; with some tiles already cached and a cache smaller than the read."""
    from gsd_wsi.slide import tiff_backend

    assert tiff_backend._DECODE_THREADS > 1 or os.cpu_count() == 1
    w, h = synthetic_tiff.spec.width_px, synthetic_tiff.spec.height_px
    with open_slide(synthetic_tiff.path) as fast, open_slide(synthetic_tiff.path, backend="openslide") as ref:
        fast.limit_cache(cache_tiles * 240 * 240 * 3)
        fast.read_level_region(0, (500, 500), (300, 300))  # some tiles cached before the large read
        for xy, size in [((0, 0), (w, h)), ((130, 70), (w - 200, 1500)), ((-50, h - 400), (w + 100, 500))]:
            n_tiles = (-(-(xy[0] + size[0]) // 240) - xy[0] // 240) * (-(-(xy[1] + size[1]) // 240) - xy[1] // 240)
            assert n_tiles >= tiff_backend._PARALLEL_DECODE_TILES
            np.testing.assert_array_equal(fast.read_level_region(0, xy, size), ref.read_level_region(0, xy, size))


def test_outside_the_slide_reads_white(synthetic_tiff) -> None:
    with open_slide(synthetic_tiff.path) as slide:
        w, h = slide.dimensions
        region = slide.read_level_region(0, (w - 10, h - 10), (50, 50))
        assert (region[10:, :] == 255).all() and (region[:, 10:] == 255).all()


def test_best_level_and_thumbnail(synthetic_svs) -> None:
    with open_slide(synthetic_svs.path) as slide:
        assert slide.mpp == 0.25
        downsamples = [lv.downsample for lv in slide.levels]
        assert downsamples[:2] == [1.0, 4.0]
        assert slide.best_level_for_mpp(0.25) == 0
        assert slide.best_level_for_mpp(0.5) == 0
        assert slide.best_level_for_mpp(1.0) == 1
        assert slide.best_level_for_mpp(0.999) == 1  # within the 2 % snap tolerance
        assert slide.best_level_for_mpp(0.9) == 0
        thumb, (sx, sy) = slide.thumbnail(8.0)
        w, h = slide.dimensions
        assert thumb.shape == (round(h / 32), round(w / 32), 3)
        assert sx == pytest.approx(32, rel=0.01) and sy == pytest.approx(32, rel=0.01)


def test_banded_thumbnail_matches_whole_resize(synthetic_tiff) -> None:
    with open_slide(synthetic_tiff.path) as slide:
        w, h = slide.dimensions
        whole = slide.read_level_region(0, (0, 0), (w, h))
        banded = slide._banded_resize(0, (w // 3, h // 3))
        direct = resize_rgb(whole, (w // 3, h // 3))
        assert np.abs(banded.astype(int) - direct).mean() < 1.0


def test_missing_and_corrupt_files(tmp_path: Path, slides_dir: Path) -> None:
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideOpenError, match="unsupported or corrupt"):
        open_slide(slides_dir / "broken.svs")
    with pytest.raises(SlideOpenError, match="folder"):
        open_slide(tmp_path)
    with pytest.raises(ConfigError, match="backend"):
        open_slide(slides_dir / "small.svs", backend="bogus")  # type: ignore[arg-type]


def test_placeholder_resolution_is_not_trusted(slides_dir: Path) -> None:
    # boxes.tiff says 72 dpi (352.8 um/px): software's default, not a scan resolution.
    with pytest.raises(MissingResolutionError, match="--slide-mpp"):
        open_slide(slides_dir / "boxes.tiff")
    with open_slide(slides_dir / "boxes.tiff", mpp=0.5) as slide:
        assert slide.mpp == 0.5 and len(slide.levels) == 4


def test_file_resolution_wins_over_fallback(synthetic_svs) -> None:
    with open_slide(synthetic_svs.path, mpp=0.5) as slide:
        assert slide.mpp == 0.25


def test_real_svs_backends_agree(slides_dir: Path) -> None:
    path = slides_dir / "CMU-1-Small-Region.svs"
    with open_slide(path) as fast, open_slide(path, backend="openslide") as ref:
        assert fast.backend == "tifffile" and fast.mpp == pytest.approx(0.499)
        for xy, size in [((0, 0), (256, 256)), ((1000, 1234), (500, 300)), ((2100, 2900), (256, 256))]:
            np.testing.assert_array_equal(fast.read_level_region(0, xy, size), ref.read_level_region(0, xy, size))


def test_plain_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    png = tmp_path / "a.png"
    Image.fromarray(pixels).save(png)
    with pytest.raises(MissingResolutionError):
        open_slide(png)
    with open_slide(png, mpp=0.5) as slide:
        assert slide.backend == "image" and slide.dimensions == (400, 300)
        np.testing.assert_array_equal(slide.read_level_region(0, (10, 20), (30, 40)), pixels[20:60, 10:40])
    Image.fromarray(pixels).save(tmp_path / "dpi.png", dpi=(25400 / 0.25, 25400 / 0.25))
    with open_slide(tmp_path / "dpi.png") as slide:
        assert slide.mpp == pytest.approx(0.25, rel=1e-3)
    tif = tmp_path / "plain.tif"
    tifffile.imwrite(tif, pixels, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", photometric="rgb")
    with open_slide(tif) as slide:
        assert slide.backend == "image" and slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_level_region(0, (0, 0), (400, 300)), pixels)


def test_tiatoolbox_backend_when_installed(synthetic_tiff) -> None:
    pytest.importorskip("tiatoolbox", reason="tiatoolbox is optional (it needs torch <= 2.12)")
    with open_slide(synthetic_tiff.path, backend="tiatoolbox") as tia, open_slide(synthetic_tiff.path) as fast:
        assert tia.dimensions == fast.dimensions
        a = tia.read_level_region(0, (100, 100), (256, 256))
        b = fast.read_level_region(0, (100, 100), (256, 256))
        assert np.abs(a.astype(int) - b).mean() < 1.0
