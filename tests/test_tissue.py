"""Tissue detection and QC pictures, on synthetic H&E scenes with known truth and on CMU-1.

Scenes are drawn in microns on a 2 um/px grid with a stain optical-density model
I = I0 * exp(-(H*c_h + E*c_e + ink)), then box-averaged to the thumbnail resolution (so the
same scene can be rendered at several mpp), with sensor noise added last.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from gsd_wsi.errors import ConfigError, NotBrightfieldError
from gsd_wsi.qc import OUTLINE_RGB, render_tissue_qc, save_png
from gsd_wsi.slide import open_slide
from gsd_wsi.synthetic import (
    SyntheticSlideSpec,
    write_fluorescence_slide,
    write_synthetic_slide,
)
from gsd_wsi.tissue import DARK_VALUE, TissueConfig, check_brightfield, detect_tissue

H_OD = np.array([0.65, 0.70, 0.29])
E_OD = np.array([0.07, 0.99, 0.11])
GLASS = np.array([236.0, 240.0, 246.0])  # I0 with a slight bluish cast
INK = {  # marker ink OD: blue ~ RGB (40,80,170), green ~ (60,140,90), black ~ (35,35,45)
    "blue": np.array([1.79, 1.10, 0.34]),
    "green": np.array([1.39, 0.54, 0.98]),
    "black": np.array([1.93, 1.93, 1.67]),
}
FINE = 2.0  # um/px of the drawing grid
SCENE_H, SCENE_W = 3200, 4000  # um
# (centre y, centre x, radius y, radius x) in um
MAIN, LUMEN = (1500, 1400, 900, 700), (1500, 1450, 260, 220)
FAINT = (2600, 900, 330, 420)  # pale staining: OD sum ~0.18
BIOPSY = (3000, 2600, 150, 150)  # 300 um across
DUST = (600, 3500, 22, 22)  # 44 um speck, stained like tissue
PENS = {  # name: (y0, x0, y1, x1, width) in um
    "blue": (250, 2400, 900, 3800, 200),
    "green": (1400, 2500, 2200, 3700, 200),
    "black": (2500, 3300, 3100, 3900, 200),
    "blue_cross": (300, 900, 2800, 1900, 250),
}
BORDER_UM = 80  # near-black scan border along the left edge


def _ellipse(yy, xx, spec):
    cy, cx, ry, rx = spec
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _stroke(yy, xx, spec):
    y0, x0, y1, x1, width = spec
    d = np.array([y1 - y0, x1 - x0], dtype=float)
    t = np.clip(((yy - y0) * d[0] + (xx - x0) * d[1]) / (d @ d), 0, 1)
    return np.hypot(yy - (y0 + t * d[0]), xx - (x0 + t * d[1])) <= width / 2


def _scene(pens: tuple[str, ...] = (), border: bool = False, seed: int = 0):
    """Fine-grid intensities (float, HxWx3) and truth layers (dict of bool HxW)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SCENE_H:FINE, 0:SCENE_W:FINE] + FINE / 2
    main = _ellipse(yy, xx, MAIN) & ~_ellipse(yy, xx, LUMEN)
    faint, biopsy, dust = (_ellipse(yy, xx, s) for s in (FAINT, BIOPSY, DUST))
    field = ndi.zoom(ndi.gaussian_filter(rng.normal(size=(80, 100)), 2), 20, order=1)
    field /= np.abs(field).max()
    nuclei = ndi.gaussian_filter(rng.normal(size=yy.shape), 2) > 0.12  # ~4-6 um blobs
    c_h = (0.45 + 0.2 * field + 1.2 * nuclei) * (main | biopsy | dust)
    c_e = (0.75 + 0.25 * field) * (main | biopsy | dust)
    c_h += (0.05 + 0.1 * nuclei) * faint
    c_e += (0.08 + 0.02 * field) * faint
    od = c_h[..., None] * H_OD + c_e[..., None] * E_OD
    lumen = ndi.binary_erosion(_ellipse(yy, xx, LUMEN), iterations=10)
    truth = {"tissue": main | faint | biopsy, "faint": faint, "biopsy": biopsy, "dust": dust}
    truth["lumen"] = lumen
    for name in pens:
        stroke = _stroke(yy, xx, PENS[name])
        od += stroke[..., None] * INK[name.split("_")[0]]
        truth[name] = stroke
    if border:
        strip = xx < BORDER_UM
        od += strip[..., None] * 3.5 + ((xx >= BORDER_UM) & (xx < BORDER_UM + 30))[..., None] * 1.5
        truth["border"] = strip
    return GLASS * np.exp(-od), truth


def _render(scene, mpp: float, seed: int = 1, noise: float = 3.0):
    """Box-average a fine scene to ``mpp``; returns uint8 thumbnail and truth at that mpp."""
    image, truth = scene
    f = int(round(mpp / FINE))
    h, w = image.shape[0] // f, image.shape[1] // f

    def down(a):
        return a[: h * f, : w * f].reshape(h, f, w, f, *a.shape[2:]).mean(axis=(1, 3))

    rgb = down(image) + np.random.default_rng(seed).normal(0, noise, (h, w, 3))
    truth = {k: down(v.astype(float)) >= 0.5 for k, v in truth.items()}
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), truth


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture(scope="module")
def clean():
    return _scene()


@pytest.fixture(scope="module")
def artefacts():
    return _scene(pens=tuple(PENS), border=True)


def test_clean_scene_matches_truth(clean):
    rgb, truth = _render(clean, 8.0)
    mask = detect_tissue(rgb, 8.0)
    assert mask.shape == rgb.shape[:2] and mask.dtype == bool
    assert _dice(mask, truth["tissue"]) > 0.95
    # precision: no halo (the tiler's per-tile fractions come from this mask)
    assert 0.98 < mask.sum() / truth["tissue"].sum() < 1.02
    assert (mask & ~truth["tissue"]).sum() < 0.01 * truth["tissue"].sum()
    assert not mask[truth["dust"]].any(), "dust speck must be removed"
    assert mask[truth["faint"]].mean() > 0.9, "faint tissue must be kept"
    assert mask[truth["biopsy"]].mean() > 0.9, "small biopsy must be kept"
    assert mask[truth["lumen"]].mean() < 0.05, "a lumen larger than max_hole_um2 stays open"


def test_faint_tissue_kept_beside_strong_tissue(clean):
    """Otsu on this scene sits above the pale region; the faint bound must keep it."""
    rgb, truth = _render(clean, 8.0)
    od_sum = np.log(GLASS / np.maximum(rgb, 1)).sum(axis=2)
    assert 0.1 < np.median(od_sum[truth["faint"]]) < 0.3
    assert (od_sum[truth["faint"]] > threshold_otsu(od_sum)).mean() < 0.1, "Otsu alone loses it"
    assert detect_tissue(rgb, 8.0)[truth["faint"]].mean() > 0.9


def test_pen_marks_and_border_rejected(artefacts):
    rgb, truth = _render(artefacts, 8.0)
    mask = detect_tissue(rgb, 8.0)
    tissue = truth["tissue"]
    near_tissue = ndi.binary_dilation(tissue, iterations=3)
    for name in ("blue", "green", "black", "blue_cross"):
        on_glass = truth[name] & ~near_tissue
        assert on_glass.sum() > 100
        assert mask[on_glass].mean() < 0.01, f"{name} pen on glass detected as tissue"
    crossing = truth["blue_cross"] & tissue
    assert mask[crossing].mean() < 0.2, "ink-dominated pen over tissue must be rejected"
    assert not mask[truth["border"]].any(), "black scan border detected as tissue"
    assert not mask[:, : int(np.ceil((BORDER_UM + 30) / 8.0))].any()
    # the tissue away from the pen is still found, and the pen does not leak into the glass
    clear = tissue & ~ndi.binary_dilation(truth["blue_cross"], iterations=3)
    assert mask[clear].mean() > 0.95
    assert (mask & ~near_tissue).sum() < 0.01 * tissue.sum()


def test_pen_kept_when_removal_disabled(artefacts):
    rgb, truth = _render(artefacts, 8.0)
    mask = detect_tissue(rgb, 8.0, TissueConfig(remove_pen=False))
    assert mask[truth["blue"] | truth["green"]].mean() > 0.5
    assert not mask[truth["border"]].any(), "borders are rejected even without pen removal"


@pytest.mark.parametrize("value", [255, 240])
def test_blank_thumbnails_give_empty_masks(value):
    flat = np.full((300, 400, 3), value, dtype=np.uint8)
    assert not detect_tissue(flat, 8.0).any()
    noisy = np.clip(flat + np.random.default_rng(0).normal(0, 3, flat.shape), 0, 255).astype(np.uint8)
    assert not detect_tissue(noisy, 8.0).any()
    assert detect_tissue(np.zeros((0, 5, 3), np.uint8), 8.0).shape == (0, 5)


def test_tissue_wall_to_wall(clean):
    """No glass in the thumbnail (a crop inside the tissue): all tissue, not a split by Otsu."""
    rgb, truth = _render(clean, 8.0)
    crop = (slice(100, 150), slice(130, 215))
    assert truth["tissue"][crop].all()
    assert detect_tissue(rgb[crop], 8.0).mean() > 0.98
    assert detect_tissue(np.full((40, 60, 3), (200, 120, 180), np.uint8), 8.0).all()


def test_pale_tissue_wall_to_wall_with_gaps_is_not_taken_for_glass():
    """Pale, near-neutral tissue filling the view, glass only in small gaps (15 %): the glass
    is the gaps' colour, not the most frequent pale level, so everything but the gaps is kept."""
    rng = np.random.default_rng(3)
    rgb = np.empty((64, 64, 3), np.float64)
    rgb[...] = (206, 190, 209)  # pale lilac: as neutral as the glass rule allows
    gaps = rng.random((64, 64)) < 0.15
    rgb[gaps] = (240, 238, 241)
    nuclei = ~gaps & (rng.random((64, 64)) < 0.2)
    rgb[nuclei] = (120, 90, 150)
    rgb = np.clip(rgb + rng.normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)
    assert detect_tissue(rgb, 8.0).mean() > 0.95


def test_real_roi_without_glass_monuseg(monuseg_dir):
    """A MoNuSeg crop of pale tumour with white gaps (once detected as no tissue at all)."""
    rgb = np.asarray(Image.open(monuseg_dir / "images" / "TCGA-21-5786-01Z-00-DX1.tif").convert("RGB"))
    assert detect_tissue(rgb, 0.2527).mean() > 0.95


def test_colour_cast_background_not_tissue():
    rgb = np.empty((300, 400, 3), dtype=np.uint8)
    rgb[...] = (232, 236, 248)
    rgb = np.clip(rgb + np.random.default_rng(2).normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)
    assert not detect_tissue(rgb, 8.0).any()


def _to_grid(mask, f):
    h, w = mask.shape[0] // f, mask.shape[1] // f
    return mask[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3)) >= 0.5


@pytest.mark.parametrize(
    ("mpp", "config"),
    [
        (4.0, TissueConfig()),  # downscaled to 8 um/px inside
        (4.0, TissueConfig(thumb_mpp=4.0)),  # detection at 4 um/px: sizes in pixels x4
        (8.0, TissueConfig()),
        (16.0, TissueConfig()),  # coarser than thumb_mpp: detection at 16 um/px
    ],
)
def test_scale_invariance(clean, mpp, config):
    """The same scene at several thumbnail resolutions gives the same mask on a 16 um grid."""
    reference = detect_tissue(_render(clean, 16.0)[0], 16.0)
    rgb, truth = _render(clean, mpp)
    mask = detect_tissue(rgb, mpp, config)
    coarse = _to_grid(mask, int(16 / mpp))
    coarse = coarse[: reference.shape[0], : reference.shape[1]]
    assert _dice(coarse, reference) > 0.97
    assert ndi.label(coarse, np.ones((3, 3)))[1] == ndi.label(reference, np.ones((3, 3)))[1]
    assert not mask[truth["dust"]].any() and mask[truth["biopsy"]].mean() > 0.9


@pytest.mark.parametrize(
    "kwargs",
    [
        {"thumb_mpp": 0},
        {"thumb_mpp": -8.0},
        {"thumb_mpp": float("nan")},
        {"min_object_um2": -1.0},
        {"max_hole_um2": float("inf")},
        {"closing_um": "16"},
        {"remove_pen": "yes"},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ConfigError) as info:
        TissueConfig(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_bad_thumb_mpp_raises():
    with pytest.raises(ConfigError, match="thumb_mpp"):
        detect_tissue(np.full((10, 10, 3), 255, np.uint8), 0.0)
    with pytest.raises(ValueError):
        detect_tissue(np.zeros((10, 10), np.uint8), 8.0)


def test_rgba_transparent_counts_as_glass(clean):
    rgb, truth = _render(clean, 8.0)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    rgba[:, :40] = 0  # openslide read_region outside the scanned area: (0, 0, 0, 0)
    mask = detect_tissue(rgba, 8.0)
    assert not mask[:, :40].any()
    assert mask[truth["biopsy"]].mean() > 0.9


def test_speed_large_thumbnail(clean):
    """5000 x 5000 px at 8 um/px (40 x 40 mm): glass with 5 x 5 copies of the scene inside."""
    rgb, truth = _render(clean, 8.0)  # 400 x 500
    glass = np.clip(np.random.default_rng(3).normal(GLASS, 3.0, (500, 500, 3)), 0, 255).astype(np.uint8)
    big = np.tile(glass, (10, 10, 1))
    big[1000:3000, 1000:3500] = np.tile(rgb, (5, 5, 1))
    mask = detect_tissue(big, 8.0)
    assert mask.shape == (5000, 5000)
    assert _dice(mask[1000:1400, 1000:1500], truth["tissue"]) > 0.95


def _cmu_thumbnail(slides_dir):
    openslide = pytest.importorskip("openslide")
    path = slides_dir / "CMU-1-Small-Region.svs"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with openslide.OpenSlide(str(path)) as slide:
        mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        w, h = slide.dimensions
        target = 8.0
        thumb = slide.get_thumbnail((round(w * mpp / target), round(h * mpp / target))).convert("RGB")
    rgb = np.asarray(thumb)
    return rgb, mpp * w / rgb.shape[1]


def test_real_slide_cmu1(slides_dir):
    rgb, mpp = _cmu_thumbnail(slides_dir)
    mask = detect_tissue(rgb, mpp)
    fraction = mask.mean()
    assert 0.3 < fraction < 0.55, f"tissue fraction {fraction:.3f}"
    labels, n = ndi.label(mask, np.ones((3, 3)))
    assert np.bincount(labels.ravel())[1:].max() > 0.95 * mask.sum(), "one main piece"
    # glass corners are background; detected pixels are darker than the glass
    assert not mask[:20, -40:].any() and not mask[-30:, :15].any()
    lum = rgb.mean(axis=2)
    assert np.median(lum[mask]) < np.median(lum[~mask]) - 40


def _slide_thumbnail(path, mpp: float | None = None) -> np.ndarray:
    with open_slide(path, mpp=mpp) as slide:  # mpp only for files that state none (boxes.tiff)
        return slide.thumbnail(max(8.0, slide.mpp))[0]


@pytest.mark.parametrize("name", ["small.svs", "CMU-1-Small-Region.svs", "boxes.tiff"])
def test_brightfield_check_passes_real_slides(slides_dir, name):
    check_brightfield(_slide_thumbnail(slides_dir / name, mpp=0.5), name)


def test_brightfield_check_passes_borders_and_pen(artefacts, tmp_path):
    rgb, _ = _render(artefacts, 8.0)
    assert (rgb.max(axis=2) < DARK_VALUE).mean() > 0.01, "the scene has a near-black border and ink"
    check_brightfield(rgb, "scene")
    for seed in (1, 2):
        spec = SyntheticSlideSpec(width_px=2048, height_px=2048, black_border=True, pen_marks=True, seed=seed)
        thumb = _slide_thumbnail(write_synthetic_slide(tmp_path / f"bf{seed}.svs", spec).path)
        check_brightfield(thumb, f"bf{seed}")
    # most of the thumbnail under a black fill, but glass beside it: still brightfield
    filled = rgb.copy()
    filled[:, : int(0.8 * rgb.shape[1])] = 16
    check_brightfield(filled, "filled")
    check_brightfield(np.zeros((0, 4, 3), np.uint8), "empty")  # nothing to measure


def test_brightfield_check_refuses_fluorescence(tmp_path):
    path = write_fluorescence_slide(tmp_path / "dapi.tiff", seed=1)
    with open_slide(path) as slide:
        assert slide.mpp == 0.5
        level0 = slide.read_level_region(0, (0, 0), slide.dimensions)
    assert level0[..., 2].max() > 150 and np.median(level0.max(axis=2)) < 20, "bright blue nuclei on black"
    with pytest.raises(NotBrightfieldError, match="expects brightfield H&E") as info:
        check_brightfield(_slide_thumbnail(path), "dapi")
    assert isinstance(info.value, ValueError) and info.value.args[0].startswith("dapi: ")
    near_black = int(re.search(r"(\d+) % of its thumbnail is near-black", str(info.value)).group(1))
    assert near_black >= 80 and "fluorescence" in str(info.value)


@pytest.mark.parametrize("value", [0, 30])
def test_brightfield_check_refuses_black(value):
    with pytest.raises(NotBrightfieldError, match=f"entirely black \\(brightest pixel {value}/255\\)"):
        check_brightfield(np.full((40, 50, 3), value, np.uint8), "black")


def test_qc_picture(clean, tmp_path):
    rgb, truth = _render(clean, 8.0)
    mask = detect_tissue(rgb, 8.0)
    ys, xs = np.nonzero(mask[::16, ::16])
    tiles = np.stack([xs * 16, ys * 16, np.full_like(xs, 16), np.full_like(xs, 16)], 1).astype(float)
    picture = render_tissue_qc(rgb, mask, tiles)
    assert picture.shape == rgb.shape and picture.dtype == np.uint8
    assert (picture == OUTLINE_RGB).all(axis=2).sum() > 100
    assert (picture[..., 2] > picture[..., 0] + 30).sum() > 0  # blue tile lines exist
    small = render_tissue_qc(rgb, mask, tiles, max_px=200)
    assert max(small.shape[:2]) == 200 and (small == OUTLINE_RGB).all(axis=2).any()
    empty = render_tissue_qc(rgb, np.zeros_like(mask), np.zeros((0, 4)))
    assert empty.shape == rgb.shape
    path = tmp_path / "qc" / "thumb.png"
    save_png(path, picture)
    assert np.array_equal(np.asarray(Image.open(path)), picture)
    assert [p.name for p in path.parent.iterdir()] == ["thumb.png"]
    with pytest.raises(ValueError):
        render_tissue_qc(rgb, mask[:-1], tiles)


def test_qc_tiles_are_blended_once_over_their_union():
    """Two overlapping 10-px tiles: a pixel they both cover is blended once, a line pixel gets
    the line blend over the fill, both as float32 then rounded; elsewhere the picture is the
    thumbnail."""
    from gsd_wsi.qc import TILE_FILL_ALPHA, TILE_LINE_ALPHA, TILE_RGB

    rgb = np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    tiles = np.array([[5, 5, 10, 10], [10, 8, 10, 10]], float)
    picture = render_tissue_qc(rgb, np.zeros((30, 60), bool), tiles)  # no tissue: no outline; too small for a legend
    colour = np.asarray(TILE_RGB, np.float32)
    fill = (1 - TILE_FILL_ALPHA) * rgb.astype(np.float32) + TILE_FILL_ALPHA * colour
    line = (1 - TILE_LINE_ALPHA) * fill + TILE_LINE_ALPHA * colour
    for y, x in [(7, 7), (12, 12), (16, 18)]:  # inside one tile, inside both, inside the second
        assert np.array_equal(picture[y, x], np.rint(fill[y, x]).astype(np.uint8)), (y, x)
    for y, x in [(5, 5), (14, 9), (8, 15), (17, 19)]:  # on an outline (one crosses the other tile)
        assert np.array_equal(picture[y, x], np.rint(line[y, x]).astype(np.uint8)), (y, x)
    outside = np.ones((30, 60), bool)
    outside[5:15, 5:15] = outside[8:18, 10:20] = False
    assert np.array_equal(picture[outside], rgb[outside])


@pytest.mark.parametrize("shape", [(37, 53, 3), (40, 41), (20, 30, 4)])
def test_png_keeps_pixels_and_text(tmp_path, shape):
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    text = {"Software": "gsd-wsi 1.0", "settings": '{"tissue": "ü"}', "path": "/scans/스캔 1.svs"}  # Latin-1 or not
    save_png(tmp_path / "p.png", pixels, text)
    with Image.open(tmp_path / "p.png") as image:
        image.load()  # checks every chunk's CRC
        assert np.array_equal(np.asarray(image), pixels) and image.text == text


def test_qc_thousands_of_tiles_downscaled():
    """20,000 tiles on a 4000 x 3000 thumbnail: downscaled to max_px, tiles scaled with it."""
    rgb = np.full((3000, 4000, 3), 240, dtype=np.uint8)
    mask = np.zeros((3000, 4000), dtype=bool)
    mask[1000:2000, 1000:3000] = True
    ys, xs = np.mgrid[1000:2000:10, 1000:3000:10]
    tiles = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, 10), np.full(xs.size, 10)], 1)
    tiles = tiles.astype(float)
    start = time.perf_counter()
    picture = render_tissue_qc(rgb, mask, tiles, max_px=1000)
    assert time.perf_counter() - start < 2.0
    assert picture.shape == (750, 1000, 3)
    inside, outside = picture[300:450, 300:700], picture[50:200, 50:200]
    assert (inside[..., 2].astype(int) > inside[..., 0] + 20).all(), "kept tiles are tinted blue"
    assert (outside == 240).all(), "no tiles, no outline away from the tissue"
    outline = (picture == OUTLINE_RGB).all(axis=2)
    assert outline[250, 300:700].all() and outline[260:490, 250].all()
    assert (picture[:12, :150] < 100).any(), "legend text in the top-left corner"
