"""`gsd-wsi evaluate`: exact scores on synthetic images, outputs, problems, protocols, CLI, real MoNuSeg."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import gsd_wsi.stages.evaluate as evaluate_module
from gsd_wsi.cli.main import app
from gsd_wsi.datasets import DatasetError
from gsd_wsi.errors import ConfigError
from gsd_wsi.metrics import hd95
from gsd_wsi.nn.unet import unet_config
from gsd_wsi.stages.evaluate import EvaluateConfig, run_evaluate, score_image
from gsd_wsi.stain import recorded_normaliser
from gsd_wsi.train.checkpoint import save_checkpoint
from gsd_wsi.train.transfer import segmentation_model_json, segmentation_unet

SIZE, RADIUS, SHIFT = 64, 12, 4
PINK, DARK = (230, 160, 200), (60, 30, 110)


def _disc(cy: int, cx: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS**2


def _image(disc: np.ndarray) -> np.ndarray:
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = PINK
    image[disc] = DARK
    return image


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """a: mask = the dark disc; b: mask = the disc shifted SHIFT px right; c: no mask."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    disc = _disc(32, 28)
    for name, truth in (("a", disc), ("b", np.roll(disc, SHIFT, axis=1))):
        Image.fromarray(_image(disc)).save(root / "images" / f"{name}.png")
        Image.fromarray(truth.astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
    Image.fromarray(_image(disc)).save(root / "images" / "c.png")
    return root


@pytest.fixture
def model_run(tmp_path: Path) -> Path:
    """A tiny random two-class segmentation model at 0.5 um/px, as `finetune` would save it."""
    model, _ = segmentation_unet(None, 2, unet_config("tiny"), patch_px=32)
    info = segmentation_model_json(model, ["background", "nucleus"], 32, 0.5, (-1.0, 1.0), {"method": "none"}, {})
    save_checkpoint(tmp_path / "run" / "model", model.state_dict(), None, info, None)
    return tmp_path / "run"


@pytest.fixture
def dark_is_nucleus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the network's prediction by "dark pixels are class 1" (exact, known answers)."""

    def fake(model, image, patch_px, overlap=0.5, input_range=(-1.0, 1.0), batch_size=4, target="semantic", tta=False):  # noqa: ANN001, ANN202
        dark = (image.astype(int).sum(axis=2) < 300).astype(np.float32)
        return np.stack([1.0 - dark, dark])

    monkeypatch.setattr(evaluate_module, "predict_probabilities", fake)


def _dice_iou(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    inter = float((pred & true).sum())
    return 2 * inter / (pred.sum() + true.sum()), inter / float((pred | true).sum())


def test_exact_scores_and_outputs(dataset: Path, model_run: Path, dark_is_nucleus: None, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = run_evaluate(dataset, model_run, out, EvaluateConfig())
    disc = _disc(32, 28)
    dice_b, iou_b = _dice_iou(disc, np.roll(disc, SHIFT, axis=1))
    assert result["n_images"] == 2 and result["classes"] == ["background", "nucleus"]
    assert any("c.png" in p for p in result["problems"])  # image without a mask
    assert result["protocol"].startswith("standard")
    with open(out / "per_image.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"a", "b"}
    assert float(rows["a"]["dice"]) == 1.0 and float(rows["a"]["iou"]) == 1.0
    assert float(rows["a"]["hd95_px"]) == 0.0
    assert float(rows["b"]["dice"]) == pytest.approx(dice_b) and float(rows["b"]["iou"]) == pytest.approx(iou_b)
    hd_b = hd95(disc, np.roll(disc, SHIFT, axis=1))
    assert float(rows["b"]["hd95_px"]) == pytest.approx(hd_b) and hd_b > 0
    assert float(rows["b"]["hd95_um"]) == pytest.approx(hd_b * 0.5)  # the model's recorded mpp
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["dice"]["mean"] == pytest.approx((1 + dice_b) / 2)
    assert summary["dice"]["std"] == pytest.approx(np.std([1.0, dice_b]))
    assert summary["dice"]["n"] == 2
    per_class = result["per_class"]["nucleus"]["dice"]
    assert per_class["mean"] == pytest.approx(summary["dice"]["mean"])
    for name in ("a", "b"):
        picture = np.asarray(Image.open(out / "overlays" / f"{name}.png"))
        assert picture.shape == (SIZE, SIZE, 3)
        assert (picture == (255, 0, 255)).all(axis=2).any()  # predicted outline in magenta
    assert (np.asarray(Image.open(out / "overlays" / "b.png")) == (0, 255, 255)).all(axis=2).any()  # true in cyan


def test_split_subset_and_mpp_override(dataset: Path, model_run: Path, dark_is_nucleus: None, tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    config = EvaluateConfig(split_file=split, subset="test", mpp=2.0)
    result = run_evaluate(dataset, model_run, tmp_path / "eval", config)
    assert result["n_images"] == 1 and result["summary"]["dice"]["std"] == 0.0
    assert result["summary"]["hd95_um"]["mean"] == pytest.approx(2.0 * result["summary"]["hd95_px"]["mean"])
    with pytest.raises(ConfigError, match="split file"):
        EvaluateConfig(subset="test")
    with pytest.raises(ConfigError, match="overlap=1.0"):
        EvaluateConfig(overlap=1.0)


def test_reference_protocol_is_labelled(dataset: Path, model_run: Path, dark_is_nucleus: None,
                                        tmp_path: Path) -> None:
    result = run_evaluate(dataset, model_run, tmp_path / "eval", EvaluateConfig(protocol="reference"))
    assert "for comparison with published numbers only" in result["protocol"]
    summary = result["summary"]
    assert {"dice", "dice_foreground", "iou", "precision", "recall"} <= set(summary)
    assert summary["dice"]["n"] == 2 * 25  # 5x5 patches of 32 px at stride 8 in each 64-px image
    assert summary["dice"]["mean"] < 1.0  # image b is shifted
    # dice is the mean over classes with background, as the reference prints it
    per_class = result["per_class"]
    assert summary["dice"]["mean"] == pytest.approx((per_class["background"]["dice"]["mean"]
                                                     + per_class["nucleus"]["dice"]["mean"]) / 2)
    assert summary["dice_foreground"]["mean"] == pytest.approx(per_class["nucleus"]["dice"]["mean"])
    assert not (tmp_path / "eval" / "overlays").exists()


def test_reference_patch_scores_by_hand() -> None:
    """Per class on one 2x2 patch, and the zero_division=1 rule for an absent class."""
    from gsd_wsi.stages.evaluate import _patch_scores

    truth = np.array([[1, 1], [0, 0]])
    pred = np.array([[1, 0], [0, 0]])
    scores = _patch_scores(pred, truth, 3)
    assert scores["dice"] == pytest.approx([2 * 2 / (2 * 2 + 1), 2 / 3, 1.0])  # class 2: absent from both
    assert scores["iou"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert scores["precision"] == pytest.approx([2 / 3, 1.0, 1.0]) and scores["recall"] == pytest.approx([1.0, 0.5, 1.0])


def test_instance_scores_perfect_and_merged() -> None:
    true_inst = np.zeros((SIZE, SIZE), dtype=np.int32)
    true_inst[_disc(20, 16)] = 1
    true_inst[_disc(44, 48)] = 2
    pred = (true_inst > 0).astype(np.int64)
    row, pred_inst = score_image(pred, pred, true_inst, ["background", "nucleus"], None)
    assert row["aji"] == 1.0 and row["pq"] == 1.0 and row["object_f1"] == 1.0 and row["n_pred"] == 2
    assert row["hd95_um"] is None  # no resolution known
    row, _ = score_image(pred, pred, true_inst, ["background", "nucleus"], None, glas=True)
    assert row["glas_f1"] == 1.0 and row["glas_object_dice"] == 1.0 and row["glas_object_hausdorff"] == 0.0
    missed = np.where(true_inst == 2, 0, pred)
    row, _ = score_image(missed, pred, true_inst, ["background", "nucleus"], None)
    assert row["object_f1"] == pytest.approx(2 / 3) and row["aji"] == pytest.approx(0.5)


def test_cli_end_to_end(dataset: Path, model_run: Path, dark_is_nucleus: None, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", str(dataset), "--model", str(model_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").is_file() and (out / "per_image.csv").is_file()
    assert (out / "overlays" / "a.png").is_file()
    assert "images" in result.output and "2/2" in result.output  # the progress bar reached its end


def test_cli_refuses_a_model_that_is_not_for_segmentation(dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pretrained" / "model"
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({"kind": "diffusion", "model": {}}))
    result = CliRunner().invoke(app, ["evaluate", str(dataset), "--model", str(folder.parent), "-o", str(tmp_path / "e")])
    assert result.exit_code == 2
    assert "not a fine-tuned segmentation model" in result.output


def test_random_model_on_monuseg(monuseg_dir: Path, tmp_path: Path) -> None:
    """A random tiny model on one real 1000x1000 MoNuSeg image (XML instances): finite AJI and PQ."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "annotations").mkdir()
    xml = sorted((monuseg_dir / "annotations").glob("*.xml"))[0]
    image = next((monuseg_dir / "images").glob(f"{xml.stem}.*"))
    (data / "images" / image.name).symlink_to(image)
    (data / "annotations" / xml.name).symlink_to(xml)
    model, _ = segmentation_unet(None, 2, unet_config("tiny"), patch_px=128)
    info = segmentation_model_json(model, ["background", "nucleus"], 128, 0.25, (-1.0, 1.0), {"method": "none"}, {})
    save_checkpoint(tmp_path / "run" / "model", model.state_dict(), None, info, None)
    result = run_evaluate(data, tmp_path / "run", tmp_path / "eval", EvaluateConfig(overlap=0.25, batch_size=8))
    assert result["n_images"] == 1 and not result["problems"]
    for key in ("aji", "pq", "object_f1", "dice"):
        assert math.isfinite(result["summary"][key]["mean"]), key
    assert result["summary"]["n_true"]["mean"] > 100  # hundreds of annotated nuclei
    assert (tmp_path / "eval" / "overlays" / f"{xml.stem}.png").is_file()


def test_stain_target_recorded_source_fitted_per_image(dataset: Path, tmp_path: Path, dark_is_nucleus: None) -> None:
    from gsd_wsi.stain import make_normalizer

    params = make_normalizer("macenko").params
    normaliser = recorded_normaliser(params)
    assert normaliser is not None and not normaliser.is_fitted and normaliser.params["target"] == params["target"]
    assert recorded_normaliser({"method": "none"}) is None
    rng = np.random.default_rng(0)
    tissue = rng.integers(40, 180, (64, 64, 3), dtype=np.uint8)
    assert normaliser.fit_source(tissue).transform(tissue, use_lut=False).shape == tissue.shape
    model, _ = segmentation_unet(None, 2, unet_config("tiny"), patch_px=32)
    info = segmentation_model_json(model, ["background", "nucleus"], 32, 0.5, (-1.0, 1.0), params, {})
    save_checkpoint(tmp_path / "run" / "model", model.state_dict(), None, info, None)
    # the synthetic discs have too few tissue pixels to fit the stains: listed, then refused as nothing is left
    with pytest.raises(DatasetError, match="no image could be scored.*tissue pixels"):
        run_evaluate(dataset, tmp_path / "run", tmp_path / "eval", EvaluateConfig())
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["n_images"] == 0 and sum("tissue pixels" in p for p in result["problems"]) == 2


def _save_model(folder: Path, mpp: float | None, data_mpp: float | None, seed: int = 0) -> Path:
    """A tiny random model (the same weights for the same seed) recording ``mpp`` and ``data_mpp``."""
    import torch

    torch.manual_seed(seed)
    model, _ = segmentation_unet(None, 2, unet_config("tiny"), patch_px=32)
    info = segmentation_model_json(model, ["background", "nucleus"], 32, mpp, (-1.0, 1.0), {"method": "none"}, {},
                                   data_mpp=data_mpp)
    save_checkpoint(folder / "model", model.state_dict(), None, info, None)
    return folder


def test_train_mpp_model_predicts_at_its_mpp_and_scores_at_the_images(dataset: Path, dark_is_nucleus: None,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A model at 0.5 um/px from images at 0.25: 64-px images are predicted at 32 px, scored at 64."""
    seen: list[tuple[int, ...]] = []
    fake = evaluate_module.predict_probabilities

    def recording(model, image, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(image.shape)
        return fake(model, image, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "predict_probabilities", recording)
    run = _save_model(tmp_path / "run", mpp=0.5, data_mpp=0.25)
    out = tmp_path / "eval"
    result = run_evaluate(dataset, run, out, EvaluateConfig())
    assert seen and set(seen) == {(SIZE // 2, SIZE // 2, 3)}
    settings = result["settings"]
    assert settings["mpp_used"] == 0.25 and settings["mpp_source"] == "model data_mpp"
    assert settings["model_mpp"] == 0.5 and settings["resampled"] is True
    with open(out / "per_image.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert float(rows["a"]["dice"]) > 0.95  # against the original 64-px mask
    assert float(rows["b"]["hd95_um"]) == pytest.approx(0.25 * float(rows["b"]["hd95_px"]))  # the images' mpp
    assert float(rows["b"]["hd95_px"]) == pytest.approx(hd95(_disc(32, 28), np.roll(_disc(32, 28), SHIFT, axis=1)),
                                                        abs=1.5)  # px of the 64-px image, not of the 32-px one
    assert np.asarray(Image.open(out / "overlays" / "a.png")).shape == (SIZE, SIZE, 3)
    seen.clear()
    reference = run_evaluate(dataset, run, tmp_path / "ref", EvaluateConfig(protocol="reference"))
    assert reference["summary"]["dice"]["n"] == 2 and set(seen) == {(32, 32, 3)}  # one 32-px patch of each 32-px image
    assert reference["settings"]["resampled"] is True


def test_no_resampling_when_the_resolutions_match(dataset: Path, tmp_path: Path) -> None:
    """A real (random) network: data_mpp equal to mpp, or --mpp within 2 %, gives today's results exactly."""
    old = _save_model(tmp_path / "old", mpp=0.5, data_mpp=None)
    new = _save_model(tmp_path / "new", mpp=0.5, data_mpp=0.5)
    results = [run_evaluate(dataset, old, tmp_path / "e_old", EvaluateConfig()),
               run_evaluate(dataset, new, tmp_path / "e_new", EvaluateConfig()),
               run_evaluate(dataset, old, tmp_path / "e_close", EvaluateConfig(mpp=0.505))]
    assert [r["settings"]["resampled"] for r in results] == [False] * 3
    assert [r["settings"]["mpp_source"] for r in results] == ["model mpp", "model data_mpp", "--mpp"]
    assert results[0]["summary"] == results[1]["summary"]
    assert (tmp_path / "e_old" / "per_image.csv").read_text() == (tmp_path / "e_new" / "per_image.csv").read_text()
    close = {k: v for k, v in results[2]["summary"].items() if "hd95_um" not in k}
    assert close == {k: v for k, v in results[0]["summary"].items() if "hd95_um" not in k}
    for name in ("a", "b"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "e_old" / "overlays" / f"{name}.png")),
                              np.asarray(Image.open(tmp_path / "e_close" / "overlays" / f"{name}.png")))


@pytest.fixture
def touching_glas(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """GlaS style t.bmp + t_anno.bmp: two touching dark discs (instances 1 and 2)."""
    root = tmp_path / "touching"
    root.mkdir()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    instances = np.zeros((SIZE, SIZE), np.uint8)
    instances[(yy - 32) ** 2 + (xx - 22) ** 2 <= 100] = 1
    instances[((yy - 32) ** 2 + (xx - 39) ** 2 <= 100) & (instances == 0)] = 2
    Image.fromarray(_image(instances > 0)).save(root / "t.bmp")
    Image.fromarray(instances).save(root / "t_anno.bmp")
    return root, instances.astype(np.int32)


def _model(tmp_path: Path, classes: list[str], extra: dict) -> Path:
    model, _ = segmentation_unet(None, len(classes), unet_config("tiny"), patch_px=32)
    info = segmentation_model_json(model, classes, 32, 0.25, (-1.0, 1.0), {"method": "none"}, extra)
    save_checkpoint(tmp_path / "m" / "model", model.state_dict(), None, info, None)
    return tmp_path / "m"


def test_contour_model_scores_watershed_instances_beside_components(
        touching_glas: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A perfect contour prediction: the recorded post-processing splits the touching discs (AJI 1),
    the connected components (the _cc keys) merge them; pixel scores are the nucleus' (Dice 1)."""
    from gsd_wsi.targets import contour_target

    data, instances = touching_glas
    target = contour_target(instances, 2)

    def fake(model, image, patch_px, overlap=0.5, input_range=(-1.0, 1.0), batch_size=4, **kwargs):  # noqa: ANN001, ANN003, ANN202
        return np.stack([(target == c) for c in range(3)]).astype(np.float32)

    monkeypatch.setattr(evaluate_module, "predict_probabilities", fake)
    postprocess = {"kind": "contour", "seed_threshold": 0.5, "min_area_um2": 1.0}
    run = _model(tmp_path, ["background", "nucleus", "boundary"],
                 {"target": {"kind": "contour", "boundary_um": 0.5}, "postprocess": postprocess})
    result = run_evaluate(data, run, tmp_path / "eval", EvaluateConfig())
    summary = result["summary"]
    assert result["classes"] == ["background", "nucleus"]
    assert summary["dice"]["mean"] == 1.0 and summary["n_pred"]["mean"] == 2 and summary["aji"]["mean"] > 0.99
    assert summary["n_pred_cc"]["mean"] == 1 and summary["aji_cc"]["mean"] < 0.6 and summary["pq_cc"]["mean"] < 0.5
    assert result["settings"]["target"] == "contour"
    assert result["settings"]["postprocess"]["seed_threshold"] == 0.5
    assert result["settings"]["postprocess"]["min_area_um2"] == 1.0  # the record; missing keys are defaults
    assert "watershed" not in result["settings"]
    # without a record the defaults are used; a mask holding instance ids is read as instances
    bare = _model(tmp_path / "bare", ["background", "nucleus", "boundary"], {"target": {"kind": "contour"}})
    assert run_evaluate(data, bare, tmp_path / "eval2", EvaluateConfig())["summary"]["n_pred"]["mean"] == 2
    masks = tmp_path / "masked"
    (masks / "images").mkdir(parents=True)
    (masks / "masks").mkdir()
    Image.fromarray(_image(instances > 0)).save(masks / "images" / "t.png")
    Image.fromarray(instances.astype(np.uint8)).save(masks / "masks" / "t.png")
    summary = run_evaluate(masks, bare, tmp_path / "eval3", EvaluateConfig())["summary"]
    assert summary["n_true"]["mean"] == 2 and summary["aji"]["mean"] > 0.99 and summary["dice"]["mean"] == 1.0


def test_semantic_model_instances_are_the_components(touching_glas: tuple[Path, np.ndarray], tmp_path: Path,
                                                     dark_is_nucleus: None) -> None:
    data, _ = touching_glas
    result = run_evaluate(data, _model(tmp_path, ["background", "nucleus"], {}), tmp_path / "eval", EvaluateConfig())
    summary = result["summary"]
    assert result["settings"]["target"] == "semantic" and result["settings"]["postprocess"] is None
    assert summary["n_pred"]["mean"] == 1  # the touching discs merge
    for key in ("aji", "pq", "dq", "sq", "object_f1", "n_pred"):
        assert summary[key] == summary[f"{key}_cc"], key


def test_cli_refuses_the_removed_watershed_flag(dataset: Path, model_run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", str(dataset), "--model", str(model_run), "-o", str(tmp_path / "e"),
                                      "--watershed"])
    assert result.exit_code == 2
    assert "--watershed was removed" in result.output and "--target contour" in result.output
    assert not (tmp_path / "e").exists()
    assert "watershed" not in EvaluateConfig.__dataclass_fields__
