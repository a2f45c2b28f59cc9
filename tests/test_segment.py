"""`gsd-wsi segment`: exact stitching end to end, agreement with whole-image prediction, the
outputs opened by their readers, the ground truth of a synthetic slide, and batch behaviour."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely.geometry
import torch
from PIL import Image

from gsd_wsi.errors import ConfigError
from gsd_wsi.masks import open_label_level, qupath_problems
from gsd_wsi.nn.inference import predict_probabilities
from gsd_wsi.nn.unet import UNet, unet_config
from gsd_wsi.slide import open_slide
from gsd_wsi.stages.segment import read_summary, run_segment, segment_slide
from gsd_wsi.stages.segment_config import SegmentConfig
from gsd_wsi.stages.segment_model import SegmentationModel, load_segmentation_model
from gsd_wsi.synthetic import (
    SyntheticSlideSpec,
    write_fluorescence_slide,
    write_synthetic_slide,
)
from gsd_wsi.train import checkpoint as ckpt
from gsd_wsi.train.transfer import segmentation_model_json

OUTPUTS = ("mask.ome.zarr", "mask.tiff", "mask.geojson", "overlay.png", "summary.json")


class Brightness(torch.nn.Module):
    """A stand-in network: a pointwise function of each pixel's colour (bright -> class 1).

    Pointwise, so every window predicts the same value for the same slide pixel, and the
    stitched result must equal the function applied to the whole slide, whatever the overlap.
    """

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logit = 12.0 * (x.mean(1, keepdim=True) - 0.6)
        return torch.cat([-logit, logit], 1)


def expected_probability(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float32) / 255.0 * 2.0 - 1.0
    logit = 12.0 * (x.mean(-1) - 0.6)
    return 1.0 / (1.0 + np.exp(-2.0 * logit))  # softmax of (-l, l)


def stand_in(mpp: float, patch_px: int = 64) -> SegmentationModel:
    return SegmentationModel(network=Brightness(), folder=Path("stand-in"), classes=["background", "gland"],  # type: ignore[arg-type]
                             patch_px=patch_px, mpp=mpp, input_range=(-1.0, 1.0), stain={"method": "none"},
                             digest="stand-in")


def save_tiny_model(folder: Path, mpp: float | None, patch_px: int = 64, stain: str = "none") -> Path:
    torch.manual_seed(0)
    net = UNet(dataclasses.replace(unet_config("tiny", init="pytorch"), out_channels=2))
    info = segmentation_model_json(net, ["background", "nucleus"], patch_px, mpp, (-1.0, 1.0), {"method": stain}, {})
    ckpt.save_checkpoint(folder / "model", net.state_dict(), None, info, None)
    return folder


@pytest.fixture(scope="module")
def glands_slide(tmp_path_factory: pytest.TempPathFactory):
    spec = SyntheticSlideSpec(width_px=4096, height_px=4096, mpp=0.5, fmt="svs", n_tissue_regions=2, seed=11)
    return write_synthetic_slide(tmp_path_factory.mktemp("glands") / "glands.svs", spec)


@pytest.fixture(scope="module")
def glands_out(glands_slide, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("glands-out")
    config = SegmentConfig(overlap=0.25, batch_size=16, probabilities=True, geojson_chunk_px=256, band_px=64,
                           chunk_px=128)
    result = segment_slide(glands_slide.path, stand_in(2.0), out, config)
    assert result.status == "ok" and result.n_windows > 0
    return out / "glands"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), mpp=2.0)


def _well_inside(cells: np.ndarray, margin: int = 2) -> np.ndarray:
    """Truth cells (16 l0 px = 4 mask px) at least ``margin`` cells from the region's edge, on the mask grid."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(cells, iterations=margin)
    return np.kron(inner, np.ones((4, 4), bool))


def test_pointwise_stand_in_is_stitched_exactly(glands_slide, glands_out: Path) -> None:
    import zarr

    # the model's 2.0 um/px is the slide's level 1 (4x of 0.5 um/px): read as is, no resize
    with open_slide(glands_slide.path) as slide:
        level1 = slide.read_level_region(1, (0, 0), (1024, 1024))
    expected = expected_probability(level1)
    stored = np.asarray(zarr.open_array(glands_out / "mask.ome.zarr" / "probabilities" / "0", mode="r")[:])
    labels = np.asarray(open_label_level(glands_out / "mask.ome.zarr", 0)[:])
    tissue = _well_inside(glands_slide.tissue_mask)[:1024, :1024]
    assert tissue.mean() > 0.1
    # in tissue: within one uint8 step of the exact pointwise value, for every overlap of windows
    error = np.abs(stored[1][tissue] / 255.0 - expected[tissue])
    assert error.max() <= 0.5 / 255 + 1e-6, error.max()
    assert np.array_equal(labels[tissue], (stored[1][tissue] > stored[0][tissue]).astype(np.uint8)) or \
        np.mean(labels[tissue] == (expected[tissue] > 0.5)) > 0.999
    # glass far from tissue: background with probability 1, though the stand-in says "gland" there
    glass = _well_inside(~glands_slide.tissue_mask, margin=3)[:1024, :1024]
    assert glass.sum() > 10000 and (expected[glass] > 0.5).mean() > 0.9
    assert labels[glass].max() == 0 and stored[0][glass].min() == 255 and stored[1][glass].max() == 0


def test_glands_agree_with_the_drawn_truth(glands_slide, glands_out: Path) -> None:
    labels = np.asarray(open_label_level(glands_out / "mask.ome.zarr", 0)[:])
    with open_slide(glands_slide.path) as slide:
        level1 = slide.read_level_region(1, (0, 0), (1024, 1024))
    truth = glands_slide.gland_mask  # cells of 16 level-0 px = 4 mask px, sampled at their centres

    def iou(pred: np.ndarray) -> float:
        pred = pred[2::4, 2::4][: truth.shape[0], : truth.shape[1]]
        return float((pred & truth).sum() / max((pred | truth).sum(), 1))

    # The bound is what the stand-in itself allows: applied to the whole image and limited to
    # the true tissue, "bright is gland" finds the lumens but not the darker rims of the drawn
    # glands (IoU ~0.45). The slide pipeline must reach that (no shift, no lost windows, no
    # seam) within 0.03; a mask shifted by one window, flipped or empty falls far below.
    ideal = iou((expected_probability(level1) > 0.5) & np.kron(glands_slide.tissue_mask, np.ones((4, 4), bool)))
    got = iou(labels == 1)
    assert ideal > 0.35 and got >= ideal - 0.03, (got, ideal)


def test_outputs_open_in_their_readers(glands_out: Path) -> None:
    for name in OUTPUTS:
        assert (glands_out / name).exists(), name
    summary = json.loads((glands_out / "summary.json").read_text())
    mpp = summary["mask"]["mpp"]
    assert mpp == pytest.approx(2.0)

    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(glands_out / "mask.ome.zarr"), fmt=FormatV04()))())
    node = nodes[0]
    assert any(isinstance(spec, Label) for spec in node.specs)
    shapes = [tuple(level.shape) for level in node.data]
    assert shapes[0] == (1024, 1024) and len(shapes) >= 2
    assert all(shapes[k + 1] == ((shapes[k][0] + 1) // 2, (shapes[k][1] + 1) // 2) for k in range(len(shapes) - 1))
    datasets = node.metadata["coordinateTransformations"]
    assert [t[0]["scale"] for t in datasets][:2] == [[mpp, mpp], [2 * mpp, 2 * mpp]]
    attrs = json.loads((glands_out / "mask.ome.zarr" / ".zattrs").read_text())
    assert [p["class"] for p in attrs["image-label"]["properties"]] == ["background", "gland"]

    with openslide.OpenSlide(glands_out / "mask.tiff") as osr:
        assert osr.level_count == len(shapes)
        assert osr.level_dimensions[0] == (1024, 1024)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        assert osr.level_downsamples[1] == pytest.approx(2.0)

    assert qupath_problems(glands_out / "mask.geojson") == []
    collection = json.loads((glands_out / "mask.geojson").read_text())
    areas = 0.0
    for feature in collection["features"]:
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.is_valid and feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "gland"
        assert len(feature["properties"]["classification"]["color"]) == 3
        # coordinates are slide level-0 pixels: area in um^2 = px area * slide mpp^2
        assert geometry.area * 0.5**2 == pytest.approx(feature["properties"]["measurements"]["Area um^2"], rel=1e-6)
        areas += geometry.area * 0.5**2
    labels = np.asarray(open_label_level(glands_out / "mask.ome.zarr", 0)[:])
    assert areas == pytest.approx((labels == 1).sum() * mpp**2, rel=1e-9)
    assert summary["class_mm2"]["gland"] == pytest.approx((labels == 1).sum() * mpp**2 / 1e6, rel=1e-9)


def test_segment_equals_whole_image_prediction(slides_dir: Path, tmp_path: Path) -> None:
    # an all-tissue 400 x 336 crop of the real slide as a plain image, small enough for both
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        crop = slide.read_level_region(0, (800, 1700), (400, 336))
    Image.fromarray(crop).save(tmp_path / "crop.png")
    folder = save_tiny_model(tmp_path / "model", mpp=0.5)
    model = load_segmentation_model(folder)
    config = SegmentConfig(overlap=0.25, batch_size=8, tissue_margin_windows=1.0)
    result = segment_slide(tmp_path / "crop.png", model, tmp_path / "out", config, slide_mpp=0.5)
    assert result.status == "ok"
    ours = np.asarray(open_label_level(tmp_path / "out" / "crop" / "mask.ome.zarr", 0)[:])
    theirs = predict_probabilities(model.network, crop, 64, overlap=0.25, batch_size=8).argmax(0)
    summary = read_summary(tmp_path / "out" / "crop")
    assert summary is not None and summary["n_windows"] == 8 * 7  # every window: 8 across 400 px, 7 down 336
    # the same windows, weights and division: only float rounding at near-ties may differ
    assert ours.shape == theirs.shape
    assert (ours != theirs).sum() <= 5, (ours != theirs).sum()


def test_bounds_are_subtracted_in_geojson(glands_slide, tmp_path: Path, monkeypatch) -> None:
    from gsd_wsi.slide.tiff_backend import TiffSlide

    config = SegmentConfig(geojson_chunk_px=256)
    plain = segment_slide(glands_slide.path, stand_in(4.0), tmp_path / "a", config)
    monkeypatch.setattr(TiffSlide, "bounds_l0_xy", property(lambda self: (1000, 600)))
    shifted = segment_slide(glands_slide.path, stand_in(4.0), tmp_path / "b", config)
    assert plain.status == shifted.status == "ok"

    def first_xy(root: Path) -> np.ndarray:
        features = json.loads((root / "glands" / "mask.geojson").read_text())["features"]
        return np.asarray(shapely.geometry.shape(features[0]["geometry"]).bounds)

    np.testing.assert_allclose(first_xy(tmp_path / "a") - first_xy(tmp_path / "b"), [1000, 600, 1000, 600])
    assert read_summary(tmp_path / "b" / "glands")["slide"]["bounds_l0_xy"] == [1000, 600]


def test_batch_isolation_skip_and_refusal(glands_slide, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((512, 512, 3), 245, np.uint8)).save(blank)
    no_mpp = tmp_path / "nompp.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(no_mpp)
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"path,slide_id,mpp\n{glands_slide.path},glands,\n{slides_dir / 'broken.svs'},broken,\n"
                        f"{blank},blank,1.0\n{no_mpp},nompp,\n{tmp_path / 'missing.svs'},missing,\n"
                        f"{slides_dir / 'CMU-1-Small-Region.svs'},coarse,\n")
    out = tmp_path / "out"
    model_at_quarter = save_tiny_model(tmp_path / "fine-model", mpp=0.25)
    config = SegmentConfig(batch_size=16)
    results = {r.slide_id: r for r in run_segment([manifest], out, tiny_model, config)}
    assert results["glands"].status == "ok"
    assert results["blank"].status == "no_tissue"
    assert results["broken"].status == "failed" and "corrupt" in results["broken"].error
    assert results["nompp"].status == "failed" and "--slide-mpp" in results["nompp"].error
    assert results["missing"].status == "failed" and "no such file" in results["missing"].error
    assert results["coarse"].status == "ok"  # 0.499 um/px slide for a 2.0 um/px model: fine
    blank_geojson = json.loads((out / "blank" / "mask.geojson").read_text())
    assert blank_geojson["type"] == "FeatureCollection" and blank_geojson["features"] == []
    assert np.asarray(open_label_level(out / "blank" / "mask.ome.zarr", 0)[:]).max() == 0
    with openslide.OpenSlide(out / "blank" / "mask.tiff") as osr:
        assert osr.level_count >= 1
    rows = list(csv.DictReader((out / "segment_summary.csv").open()))
    assert [r["slide_id"] for r in rows] == ["glands", "broken", "blank", "nompp", "missing", "coarse"]
    assert {"tissue_mm2", "nucleus_mm2", "n_windows", "seconds", "error"} <= set(rows[0])

    again = {r.slide_id: r.status for r in run_segment([manifest], out, tiny_model, config)}
    assert again["glands"] == again["blank"] == again["coarse"] == "skipped"
    # a slide coarser than the model: refused with the fix, nothing written
    coarse = run_segment([slides_dir / "CMU-1-Small-Region.svs"], tmp_path / "out-fine", model_at_quarter, config)[0]
    assert coarse.status == "failed" and "--train-mpp" in coarse.error and "coarser" in coarse.error
    assert not (tmp_path / "out-fine" / "CMU-1-Small-Region").exists()
    # another model into the same folder: refused unless --overwrite
    other = save_tiny_model(tmp_path / "other-model", mpp=2.0, stain="macenko")
    refused = run_segment([glands_slide.path], out, other, config, )[0]
    assert refused.status == "failed" and "--overwrite" in refused.error
    redone = run_segment([glands_slide.path], out, other, config, overwrite=True)[0]
    assert redone.status == "ok"
    assert read_summary(out / "glands")["model"]["stain"] == "macenko"


def test_fluorescence_slide_is_refused(tmp_path: Path) -> None:
    good = write_synthetic_slide(tmp_path / "good.svs", SyntheticSlideSpec(width_px=1024, height_px=1024, seed=4))
    dapi = write_fluorescence_slide(tmp_path / "dapi.tiff", width_px=1024, height_px=1024)
    out = tmp_path / "out"
    results = run_segment([good.path, dapi], out, stand_in(2.0), SegmentConfig(batch_size=16))
    assert [(r.slide_id, r.status) for r in results] == [("good", "ok"), ("dapi", "failed")]
    assert "expects brightfield H&E" in results[1].error and "near-black" in results[1].error
    assert (out / "good" / "summary.json").exists() and not (out / "dapi").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_models_that_cannot_segment_are_refused(tmp_path: Path, pretrained_run: Path) -> None:
    with pytest.raises(ConfigError, match="not a fine-tuned segmentation model"):
        load_segmentation_model(pretrained_run)
    with pytest.raises(ConfigError, match="no such folder"):
        load_segmentation_model(tmp_path / "nothing")
    no_mpp = save_tiny_model(tmp_path / "no-mpp", mpp=None)
    with pytest.raises(ConfigError, match="--mpp"):
        load_segmentation_model(no_mpp)
    broken = save_tiny_model(tmp_path / "broken", mpp=1.0)
    (broken / "model" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="incomplete"):
        load_segmentation_model(broken)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gsd_wsi", *args], capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(glands_slide, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    done = _cli("segment", str(glands_slide.path), "--model", str(tiny_model), "-o", str(tmp_path / "out"),
                "--batch-size", "16", "--min-area-um2", "50")
    assert done.returncode == 0, done.stderr
    assert all((tmp_path / "out" / "glands" / name).exists() for name in OUTPUTS)
    assert "windows/s" in done.stderr or "windows" in done.stderr
    failed = _cli("segment", str(slides_dir / "broken.svs"), "--model", str(tiny_model), "-o", str(tmp_path / "out"))
    assert failed.returncode == 1 and "corrupt" in failed.stderr
    bad = _cli("segment", str(glands_slide.path), "--model", str(tmp_path), "-o", str(tmp_path / "out"))
    assert bad.returncode == 2 and "finetune" in bad.stderr
    bad_option = _cli("segment", str(glands_slide.path), "--model", str(tiny_model), "-o", str(tmp_path / "o2"),
                      "--overlap", "1.5")
    assert bad_option.returncode == 2 and "--overlap" in bad_option.stderr


def test_kill_mid_slide_then_rerun(tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "big.svs", SyntheticSlideSpec(width_px=8192, height_px=8192, mpp=0.5,
                                                                          seed=2))
    model = save_tiny_model(tmp_path / "model", mpp=1.0)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "gsd_wsi", "segment", str(slide.path), "--model", str(model), "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob(".tmp-big*/mask.ome.zarr/0/*")):
            time.sleep(0.2)
        assert proc.poll() is None, "finished before it could be killed; make the slide bigger"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "big").exists()  # nothing under the final name
    assert list(out.glob(".tmp-*"))
    config = SegmentConfig(batch_size=16)
    result = run_segment([slide.path], out, model, config)[0]
    assert result.status == "ok"
    assert not list(out.glob(".tmp-*"))
    assert read_summary(out / "big")["n_windows"] == result.n_windows


def test_memory_does_not_grow_with_slide_height(tmp_path: Path) -> None:
    """numpy's peak (tracemalloc sees every array) for a slide 4x taller, same width: the
    stitcher, the band writer, the reader's tile cache and the vectoriser hold bands, never
    the whole mask."""
    import tracemalloc

    peaks = []
    for height in (2048, 8192, 32768):  # the first warms up (one-time allocations)
        slide = write_synthetic_slide(tmp_path / f"s{height}.svs", SyntheticSlideSpec(
            width_px=4096, height_px=height, mpp=0.5, n_tissue_regions=max(2, height // 2048), seed=4))
        # tissue detection's thumbnail is the one part that grows with area (at 1/256 of it, at
        # 8 um/px); capped here so that the test sees whether anything else grows
        config = SegmentConfig(batch_size=16, band_px=64, chunk_px=128, geojson_chunk_px=256,
                               tissue_max_mpx=0.2)
        model = stand_in(2.0)
        tracemalloc.start()
        try:
            result = segment_slide(slide.path, model, tmp_path / "out", config)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert result.status == "ok"
    # the mask grows 4x (1024 x 2048 -> 1024 x 8192 px); the peak stays within 30 %
    assert peaks[2] < 1.3 * peaks[1], peaks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_predictions_match_cpu(tmp_path: Path) -> None:
    """bf16 autocast, channels_last and pinned transfers on CUDA give the CPU's classes."""
    folder = save_tiny_model(tmp_path / "model", mpp=1.0)
    windows = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    cpu = load_segmentation_model(folder, device="cpu").predict(windows)
    gpu = load_segmentation_model(folder, device="cuda").predict(windows)
    assert gpu.shape == cpu.shape and np.abs(gpu - cpu).max() < 0.05


class ContourColours(torch.nn.Module):
    """A stand-in contour network, pointwise: dark pixels interior, mid-tone boundary, pink background."""

    CENTRES = (0.47, -0.5, 0.02)  # mean of the input in [-1, 1] for background, interior, boundary

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = x.mean(1, keepdim=True)
        return torch.cat([-40.0 * (m - c) ** 2 for c in self.CENTRES], 1)


def _nuclei_image(height: int, width: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image painted from the contour target of touching pairs and single discs, and its instances."""
    from gsd_wsi.targets import contour_target

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    instances = np.zeros((height, width), np.int32)
    k = 0
    for cy in range(14, height - 14, 30):
        for cx in range(14, width - 30, 40):
            for dx in (0, 12) if rng.random() < 0.5 else (0,):
                k += 1
                r = rng.uniform(6.0, 9.0)
                disc = (yy - cy - rng.uniform(-3, 3)) ** 2 + (xx - cx - dx) ** 2 < r * r
                instances[disc & (instances == 0)] = k
    colours = np.array([(220, 150, 190), (60, 20, 110), (140, 80, 170)], np.uint8)
    return colours[contour_target(instances, 2)], instances


def test_instance_model_writes_nuclei_whole_across_borders(tmp_path: Path) -> None:
    """A contour model: instances.ome.zarr, one QuPath detection per nucleus, the count in
    summary.json; nuclei crossing the 128-px chunk rows are neither split nor counted twice."""
    from gsd_wsi.metrics import aji

    image, truth = _nuclei_image(700, 420)
    Image.fromarray(image).save(tmp_path / "nuclei.png")
    info = {"target": {"kind": "contour", "boundary_um": 1.0, "boundary_px": 2.0},
            "postprocess": {"kind": "contour", "seed_threshold": 0.5, "foreground_threshold": 0.5,
                            "min_area_um2": 2.0}}
    model = SegmentationModel(network=ContourColours(), folder=Path("stand-in"),  # type: ignore[arg-type]
                              classes=["background", "nucleus", "boundary"], patch_px=64, mpp=0.5,
                              input_range=(-1.0, 1.0), stain={"method": "none"}, digest="contour-stand-in", info=info)
    config = SegmentConfig(overlap=0.25, batch_size=8, band_px=64, chunk_px=128, probabilities=True)
    result = segment_slide(tmp_path / "nuclei.png", model, tmp_path / "out", config, slide_mpp=0.5)
    assert result.status == "ok"
    out = tmp_path / "out" / "nuclei"
    ids = np.asarray(open_label_level(out / "instances.ome.zarr", 0)[:]).astype(np.int64)
    assert ids.shape == truth.shape and open_label_level(out / "instances.ome.zarr", 1).dtype == np.uint32
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    node = list(Reader(parse_url(str(out / "instances.ome.zarr"), fmt=FormatV04()))())[0]
    assert any(isinstance(spec, Label) for spec in node.specs) and node.data[0].dtype == np.uint32
    assert aji(ids, truth) > 0.9
    n_truth = int(truth.max())
    # one id per true nucleus, and no id shared by two: matched by majority overlap
    best = {t: np.bincount(ids[truth == t]).argmax() for t in range(1, n_truth + 1)}
    assert all(best.values()) and len(set(best.values())) == n_truth  # no nucleus lost, none merged
    assert int(ids.max()) == n_truth  # none split, none counted twice
    crossing = [t for t in range(1, n_truth + 1) if any(
        (truth[b - 1] == t).any() and (truth[b] == t).any() for b in range(128, 700, 128))]
    assert len(crossing) >= 5
    # whole: its id covers it on both sides of the border (a touching neighbour may take a rim pixel)
    cover = [float((ids[truth == t] == best[t]).mean()) for t in crossing]
    assert min(cover) > 0.85, cover
    # the class mask is background / nucleus, the union of the instances
    mask = np.asarray(open_label_level(out / "mask.ome.zarr", 0)[:])
    assert np.array_equal(mask > 0, ids > 0) and mask.max() == 1
    # GeoJSON: one QuPath detection per nucleus, with its area and haematoxylin OD
    features = json.loads((out / "mask.geojson").read_text())["features"]
    assert len(features) == n_truth
    first = features[0]["properties"]
    assert first["objectType"] == "detection" and first["classification"]["name"] == "nucleus"
    assert set(first["measurements"]) == {"Area um^2", "Hematoxylin OD mean"}
    areas = sorted(f["properties"]["measurements"]["Area um^2"] for f in features)
    assert areas == pytest.approx(sorted(np.bincount(ids.ravel())[1:] * 0.25), rel=1e-6)
    assert all(shapely.geometry.shape(f["geometry"]).is_valid for f in features)
    assert qupath_problems(out / "mask.geojson") == []
    ods = [f["properties"]["measurements"]["Hematoxylin OD mean"] for f in features]
    assert 0.3 < np.median(ods) < 1.5  # dark purple nuclei
    summary = read_summary(out)
    nuclei = summary["nuclei"]
    assert nuclei["count"] == n_truth and summary["model"]["target"] == "contour"
    assert nuclei["per_mm2_tissue"] == pytest.approx(n_truth / summary["tissue_mm2"])
    assert nuclei["larger_than_margin"] == 0 and list(summary["class_mm2"]) == ["nucleus"]
    assert result.nuclei["count"] == n_truth and "nuclei" in result.describe()
