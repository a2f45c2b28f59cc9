"""`gsd-wsi finetune`: learns a toy task, records what segment needs, refuses bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gsd_wsi.cli.main import app
from gsd_wsi.datasets import DatasetError
from gsd_wsi.errors import ConfigError, RunFolderError, StainError
from gsd_wsi.stages.finetune import FinetuneConfig, run_finetune
from gsd_wsi.stain import recorded_normaliser
from gsd_wsi.train.transfer import load_segmentation_network

FAST = dict(model="tiny", init="pytorch", epochs=6, batch_size=4, patch_px=32, crops_per_image=4, lr=2e-3,
            val_fraction=0.25, seed=0)


def _toy_dataset(root: Path, n: int = 8, max_label: int = 1, background: tuple[int, int, int] = (230, 160, 200)) -> Path:
    """Pink images with dark purple discs; the mask marks the discs (class 1)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        label = np.zeros((64, 64), np.uint8)
        for _ in range(4):
            cy, cx, r = rng.integers(8, 56), rng.integers(8, 56), rng.integers(4, 8)
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
        image = np.where(label[..., None] > 0, [90, 40, 120], background).astype(np.float64)
        image += rng.normal(0, 6, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(label * max_label).save(root / "masks" / f"im{i}.png")
    return root


def test_learns_a_toy_task_and_records_preprocessing(tmp_path: Path) -> None:
    data = _toy_dataset(tmp_path / "data")
    model_dir = run_finetune(data, tmp_path / "run", FinetuneConfig(**FAST, mpp=0.25), pretrained=None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    assert max(r["val_dice"] for r in rows) > 0.6
    model, info = load_segmentation_network(tmp_path / "run")
    assert info["classes"] == ["background", "class_1"] and info["patch_px"] == 32 and info["mpp"] == 0.25
    assert info["input_range"] == [-1.0, 1.0] and info["stain"] == {"method": "none"}
    assert info["val_dice"] == max(r["val_dice"] for r in rows)  # the best epoch is the one kept
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "last" / "model.safetensors").is_file()
    split = json.loads((tmp_path / "run" / "config.json").read_text())["split"]
    assert len(split["val"]) == 2 and not set(split["val"]) & set(split["train"])
    assert model_dir == tmp_path / "run" / "model"


def test_from_pretrained_and_label_fraction(tmp_path: Path, pretrained_run: Path) -> None:
    data = _toy_dataset(tmp_path / "data")
    config = FinetuneConfig(**FAST | {"epochs": 1, "label_fraction": 0.34})
    run_finetune(data, tmp_path / "run", config, pretrained=pretrained_run)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["pretrained"]["pretrained"].endswith("model") and saved["pretrained"]["loaded_tensors"] > 0
    assert len(saved["split"]["train"]) == 2  # round(0.34 * 6)


def test_frozen_warm_up_and_slower_body(tmp_path: Path, pretrained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--freeze-body-epochs 1: after one epoch the body is still the pretrained one, after two it
    has moved; body and head split the parameters; both options are refused from scratch."""
    from gsd_wsi.stages.finetune import body_and_head
    from gsd_wsi.train import checkpoint as ckpt

    data = _toy_dataset(tmp_path / "data")
    pretrained = ckpt.load_weights(pretrained_run / "model", ema=True)
    one = FinetuneConfig(**FAST | {"epochs": 2, "freeze_body_epochs": 1, "model": None})
    import gsd_wsi.stages.finetune as stage
    weights_after_epoch: list[dict] = []
    real_save = stage.ckpt.save_checkpoint

    def spy(folder, state_dict, *args, **kwargs):
        if Path(folder).name == "checkpoint":
            weights_after_epoch.append({k: v.clone() for k, v in state_dict.items()})
        return real_save(folder, state_dict, *args, **kwargs)

    monkeypatch.setattr(stage.ckpt, "save_checkpoint", spy)
    run_finetune(data, tmp_path / "run2", one, pretrained=pretrained_run)
    monkeypatch.undo()
    first, second = weights_after_epoch
    head = set(load_segmentation_network(tmp_path / "run2")[0].head_parameter_names())
    body_names = [k for k in first if k not in head and k in pretrained and "weight" in k]
    assert body_names and all(torch.equal(first[k], pretrained[k]) for k in body_names)  # frozen in epoch 1
    assert not all(torch.equal(second[k], pretrained[k]) for k in body_names)            # trained in epoch 2
    model = load_segmentation_network(tmp_path / "run2" / "last")[0]
    body, head_params = body_and_head(model)
    assert len(body) + len(head_params) == len(list(model.parameters())) and head_params
    with pytest.raises(ConfigError, match="from scratch"):
        run_finetune(data, tmp_path / "run3", FinetuneConfig(**FAST | {"body_lr_scale": 0.1}), pretrained=None)
    with pytest.raises(ConfigError, match="--freeze-body-epochs"):
        FinetuneConfig(epochs=3, freeze_body_epochs=3)
    with pytest.raises(ConfigError, match="--body-lr-scale"):
        FinetuneConfig(body_lr_scale=0)


def test_bad_input(tmp_path: Path, pretrained_run: Path) -> None:
    data = _toy_dataset(tmp_path / "data", max_label=3)  # labels 0 and 3 with --classes 2
    with pytest.raises(DatasetError):
        run_finetune(data, tmp_path / "run", FinetuneConfig(**FAST), pretrained=None)
    good = _toy_dataset(tmp_path / "good")
    with pytest.raises(ConfigError, match="--patch-px 32"):
        run_finetune(good, tmp_path / "run2", FinetuneConfig(**FAST | {"patch_px": 64}), pretrained=pretrained_run)
    run_finetune(good, tmp_path / "run3", FinetuneConfig(**FAST | {"epochs": 1}), pretrained=None)
    with pytest.raises(RunFolderError, match="--overwrite"):
        run_finetune(good, tmp_path / "run3", FinetuneConfig(**FAST | {"epochs": 1}), pretrained=None)
    with pytest.raises(ConfigError, match="label-fraction"):
        FinetuneConfig(label_fraction=0)


def test_cli(tmp_path: Path, pretrained_run: Path) -> None:
    data = _toy_dataset(tmp_path / "data")
    result = CliRunner().invoke(app, [
        "finetune", str(data), "-o", str(tmp_path / "run"), "--pretrained", str(pretrained_run), "--classes", "2",
        "--epochs", "1", "--batch-size", "4", "--patch-px", "32", "--crops-per-image", "2", "--class-names",
        "background,nucleus"])
    assert result.exit_code == 0, result.output
    _, info = load_segmentation_network(tmp_path / "run")
    assert info["classes"] == ["background", "nucleus"]
    bad = CliRunner().invoke(app, ["finetune", str(data), "-o", str(tmp_path / "run4"), "--pretrained", "none",
                                   "--classes", "2", "--model", "tiny", "--patch-px", "32", "--label-fraction", "0"])
    assert bad.exit_code == 2 and "label-fraction" in bad.output


def test_model_is_kept_when_validation_dice_is_undefined(tmp_path: Path) -> None:
    """Validation images without foreground give no Dice; the latest model is still written."""
    data = _toy_dataset(tmp_path / "data")
    for mask in sorted((data / "masks").glob("*.png")):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    run_finetune(data, tmp_path / "run", FinetuneConfig(**FAST | {"epochs": 2}), pretrained=None)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_stain_normalisation_is_applied_and_recorded_for_segment(tmp_path: Path, method: str) -> None:
    """Training images go through the normaliser; the model records its target, not a source."""
    from gsd_wsi.stages.finetune import stain_normaliser

    data = _toy_dataset(tmp_path / "data", background=(170, 100, 150))  # stained everywhere, as tissue is
    config = FinetuneConfig(**FAST | {"epochs": 1, "stain": method})
    run_finetune(data, tmp_path / "run", config, pretrained=None)
    _, info = load_segmentation_network(tmp_path / "run")
    assert info["stain"]["method"] == method and info["stain"]["source"] is None
    assert info["stain"]["target"] == stain_normaliser(config).params["target"]
    image = np.asarray(Image.open(data / "images" / "im0.png"))
    restored = recorded_normaliser(info["stain"])  # what evaluate (and segment) rebuild from the record
    expected = stain_normaliser(config).fit_source(image).transform(image, use_lut=False)
    assert np.array_equal(restored.fit_source(image).transform(image, use_lut=False), expected)
    assert not np.array_equal(expected, image)


def test_stain_fit_failure_names_the_image(tmp_path: Path) -> None:
    data = _toy_dataset(tmp_path / "data")  # mostly pale background: too few tissue pixels to fit
    with pytest.raises(StainError, match="im[0-9].png.*too few tissue pixels"):
        run_finetune(data, tmp_path / "run", FinetuneConfig(**FAST | {"stain": "reinhard"}), pretrained=None)


def test_stain_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="--stain must be one of"):
        FinetuneConfig(stain="hematoxylin")
    with pytest.raises(ConfigError, match="no effect with --stain none"):
        FinetuneConfig(stain_target=Path("target.png"))


def test_train_mpp_resamples_before_cropping_and_records_both_resolutions(tmp_path: Path) -> None:
    """64-px images at 0.25 um/px train as 32-px images at 0.5; model.json: mpp 0.5, data_mpp 0.25."""
    from gsd_wsi.datasets import discover
    from gsd_wsi.stages.finetune import _load

    data = _toy_dataset(tmp_path / "data")
    result = CliRunner().invoke(app, [
        "finetune", str(data), "-o", str(tmp_path / "run"), "--pretrained", "none", "--model", "tiny",
        "--init", "pytorch", "--epochs", "1", "--batch-size", "4", "--patch-px", "16", "--crops-per-image", "2",
        "--mpp", "0.25", "--train-mpp", "0.5"])
    assert result.exit_code == 0, result.output
    _, info = load_segmentation_network(tmp_path / "run")
    assert info["mpp"] == 0.5 and info["data_mpp"] == 0.25 and info["patch_px"] == 16
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["finetune"]["train_mpp"] == 0.5 and saved["finetune"]["mpp"] == 0.25
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_dice" in rows[-1]  # validated at the images' own resolution, as evaluate does
    config = FinetuneConfig(**FAST | {"mpp": 0.25, "train_mpp": 0.5})
    items = discover(data)[0][:2]
    for image, label, ignored in _load(items, config, None, config.train_mpp):
        assert image.shape == (32, 32, 3) and label.shape == (32, 32) and set(np.unique(label)) <= {0, 1}
        assert ignored is None
    assert [e[0].shape for e in _load(items, config, None)] == [(64, 64, 3)] * 2  # validation: untouched


def test_train_mpp_refusals() -> None:
    with pytest.raises(ConfigError, match="--train-mpp 0.25 is finer than the training images .0.5 um/px.*upsample"):
        FinetuneConfig(mpp=0.5, train_mpp=0.25)
    assert FinetuneConfig(mpp=0.5, train_mpp=0.495).model_mpp == 0.495  # within 2 %: allowed, no resampling
    with pytest.raises(ConfigError, match="--train-mpp must be a positive"):
        FinetuneConfig(train_mpp=0.0)


def test_train_mpp_needs_the_images_resolution(tmp_path: Path) -> None:
    data = _toy_dataset(tmp_path / "data", n=4)  # PNG images and masks: no recorded resolution
    with pytest.raises(ConfigError, match="needs the resolution of the training images.*4 of 4 record none.*--mpp"):
        run_finetune(data, tmp_path / "run", FinetuneConfig(**FAST | {"train_mpp": 0.5}), pretrained=None)
    assert not (tmp_path / "run").exists()


def test_train_mpp_takes_the_resolution_aperio_xml_records(tmp_path: Path) -> None:
    """MoNuSeg-style .tif + .xml with MicronsPerPixel: no --mpp needed; an explicit --mpp wins."""
    import tifffile

    from gsd_wsi.stages.finetune import with_data_mpp

    root = tmp_path / "monuseg"
    root.mkdir()
    for i, mpp in enumerate(("0.2527", "0.2520", "0.2456")):  # the spread of MoNuSeg's files
        image = np.full((64, 64, 3), (230, 160, 200), np.uint8)
        image[20:40, 20:40] = (90, 40, 120)
        tifffile.imwrite(root / f"im{i}.tif", image)
        (root / f"im{i}.xml").write_text(
            f'<Annotations MicronsPerPixel="{mpp}"><Annotation Id="1"><Regions><Region Id="1"><Vertices>'
            '<Vertex X="20" Y="20"/><Vertex X="40" Y="20"/><Vertex X="40" Y="40"/><Vertex X="20" Y="40"/>'
            "</Vertices></Region></Regions></Annotation></Annotations>")
    run_finetune(root, tmp_path / "run", FinetuneConfig(**FAST | {"epochs": 1, "patch_px": 16, "train_mpp": 0.5}),
                 pretrained=None)
    _, info = load_segmentation_network(tmp_path / "run")
    assert info["mpp"] == 0.5 and info["data_mpp"] == pytest.approx(0.252)  # median of the three recorded
    assert "annotations" in json.loads((tmp_path / "run" / "config.json").read_text())["data_mpp_source"]
    from gsd_wsi.datasets import discover

    items = discover(root)[0]
    assert with_data_mpp(FinetuneConfig(mpp=0.3, train_mpp=0.5), items)[0].mpp == 0.3
    (root / "im2.xml").write_text((root / "im2.xml").read_text().replace("0.2456", "0.5"))
    with pytest.raises(ConfigError, match="resolutions from 0.252 to 0.5"):
        with_data_mpp(FinetuneConfig(train_mpp=0.5), items)
    with pytest.raises(ConfigError, match="finer than the training images"):
        with_data_mpp(FinetuneConfig(train_mpp=0.2), items[:2])


def _touching_nuclei_dataset(root: Path, n: int = 4) -> Path:
    """images/ + masks/ whose masks hold instance ids: pairs of touching discs, one component each."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        instances = np.zeros((64, 64), np.uint8)
        for pair in range(2):
            cy, cx, r = 16 + 32 * pair, int(rng.integers(14, 26)), 6
            instances[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2 * pair + 1
            right = ((yy - cy) ** 2 + (xx - cx - 2 * r) ** 2 <= r * r) & (instances == 0)
            instances[right] = 2 * pair + 2
        image = np.where(instances[..., None] > 0, [90, 40, 120], (230, 160, 200)).astype(np.float64)
        image += rng.normal(0, 6, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(instances).save(root / "masks" / f"im{i}.png")
    return root


def test_contour_target_trains_three_classes_and_records_the_target(tmp_path: Path) -> None:
    from gsd_wsi.datasets import discover
    from gsd_wsi.stages.finetune import _load
    from gsd_wsi.targets import contour_target

    data = _touching_nuclei_dataset(tmp_path / "data")
    result = CliRunner().invoke(app, [
        "finetune", str(data), "-o", str(tmp_path / "run"), "--pretrained", "none", "--model", "tiny",
        "--init", "pytorch", "--epochs", "1", "--batch-size", "4", "--patch-px", "32", "--crops-per-image", "2",
        "--mpp", "0.25", "--target", "contour", "--boundary-um", "0.5", "--class-names", "background,nucleus"])
    assert result.exit_code == 0, result.output
    model, info = load_segmentation_network(tmp_path / "run")
    assert info["classes"] == ["background", "nucleus", "boundary"] and model.config.out_channels == 3
    assert info["target"] == {"kind": "contour", "boundary_um": 0.5, "boundary_px": 2.0}
    assert math.isfinite(info["val_dice"])  # the nucleus Dice (interior + boundary) of the validation image
    assert info["postprocess"]["kind"] == "contour"  # tuned on the validation image
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["finetune"]
    assert saved["target"] == "contour" and saved["boundary_um"] == 0.5
    # the training labels: the mask's instance ids made into interior / boundary, the pairs kept apart
    config = FinetuneConfig(**FAST | {"mpp": 0.25, "target": "contour", "boundary_um": 0.5})
    image, instances, ignored = _load(discover(data)[0][:1], config, None)[0]
    assert ignored is None  # labelled images label every pixel
    assert set(np.unique(instances)) == {0, 1, 2, 3, 4}
    assert set(np.unique(contour_target(instances, config.boundary_px))) == {0, 1, 2}


def test_semantic_models_record_their_target(tmp_path: Path) -> None:
    data = _toy_dataset(tmp_path / "data", n=4)
    run_finetune(data, tmp_path / "run", FinetuneConfig(**FAST | {"epochs": 1}), pretrained=None)
    assert load_segmentation_network(tmp_path / "run")[1]["target"] == {"kind": "semantic"}


def test_finetune_records_postprocessing_tuned_on_validation_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After training, tune_postprocess sees (probabilities, instances) of each validation image, and
    model.json records its settings and validation AJI; a semantic target's instances are components."""
    import gsd_wsi.stages.finetune as finetune_stage
    from gsd_wsi.instances import PostprocessConfig

    seen: list[tuple] = []

    def tune_postprocess(pairs, kind: str, mpp: float):
        seen.extend((p.shape, t.shape, int(t.max()), kind, mpp) for p, t in pairs)
        return PostprocessConfig(kind=kind, seed_threshold=0.3), {"aji": 0.625, "pq": 0.5}

    monkeypatch.setattr(finetune_stage, "tune_postprocess", tune_postprocess)
    data = _touching_nuclei_dataset(tmp_path / "data")
    config = FinetuneConfig(**FAST | {"epochs": 1, "mpp": 0.25, "target": "contour", "boundary_um": 0.5})
    run_finetune(data, tmp_path / "run", config, pretrained=None)
    info = load_segmentation_network(tmp_path / "run")[1]
    assert info["postprocess"] == PostprocessConfig(kind="contour", seed_threshold=0.3).to_dict()
    assert info["val_aji"] == 0.625 and info["val_pq"] == 0.5 and info["val_instance_images"] == 1
    assert seen == [((3, 64, 64), (64, 64), 4, "contour", 0.25)]  # one validation image: two touching pairs
    seen.clear()
    data = _toy_dataset(tmp_path / "toy", n=4)
    run_finetune(data, tmp_path / "semantic", FinetuneConfig(**FAST | {"epochs": 1, "mpp": 0.25}), pretrained=None)
    assert load_segmentation_network(tmp_path / "semantic")[1]["postprocess"]["kind"] == "semantic"
    assert [s[3:] for s in seen] == [("semantic", 0.25)] and seen[0][0][0] == 2  # instances: the mask's components


def test_post_processing_is_tuned_on_true_instances_only(tmp_path: Path) -> None:
    """Binary masks merge touching nuclei: tuning uses the images with instance ids (or XML) when any has them."""
    from gsd_wsi.datasets import discover
    from gsd_wsi.stages.finetune import tuning_examples

    data = _touching_nuclei_dataset(tmp_path / "data")
    binary = np.asarray(Image.open(data / "masks" / "im0.png")) > 0
    Image.fromarray(binary.astype(np.uint8)).save(data / "masks" / "im0.png")
    items = discover(data)[0]
    config = FinetuneConfig(**FAST | {"mpp": 0.25, "target": "contour"})
    picked = tuning_examples(items, config, None)
    assert len(picked) == len(items) - 1 and all(instances.max() == 4 and ignored is None for _, instances, ignored in picked)
    only_binary = [item for item in items if item.name == "im0"]
    assert len(tuning_examples(only_binary, config, None)) == 1  # none true: the components, with a warning
    assert tuning_examples(items, FinetuneConfig(**FAST | {"classes": 3}), None) == []


def test_distance_target_trains_evaluates_and_segments(tmp_path: Path) -> None:
    """--target distance: background/object softmax plus a sigmoid distance map; evaluate and segment read it."""
    from gsd_wsi.nn.inference import output_probabilities
    from gsd_wsi.nn.losses import DistanceTargetLoss, SegmentationLoss
    from gsd_wsi.stages.evaluate import EvaluateConfig, run_evaluate
    from gsd_wsi.stages.segment_model import load_segmentation_model
    from gsd_wsi.targets import distance_label, distance_target

    data = _touching_nuclei_dataset(tmp_path / "data")
    config = FinetuneConfig(**FAST | {"epochs": 2, "mpp": 0.25, "target": "distance"})
    run_finetune(data, tmp_path / "run", config, pretrained=None)
    model, info = load_segmentation_network(tmp_path / "run")
    assert info["classes"] == ["background", "class_1", "distance"] and model.config.out_channels == 3
    assert info["target"]["kind"] == "distance" and info["postprocess"]["kind"] == "distance"
    # the label carries the distance at 1/254 steps; the loss decodes it
    instances = np.asarray(Image.open(data / "masks" / "im0.png")).astype(np.int32)
    label = distance_label(instances)
    decoded = np.where(label > 0, (label.astype(float) - 1) / 254, 0.0)
    assert np.abs(decoded - distance_target(instances)).max() <= 0.5 / 254 + 1e-6
    logits = torch.randn(2, 3, 8, 8)
    probs = output_probabilities(logits, "distance")
    assert torch.allclose(probs[:, :2].sum(1), torch.ones(2, 8, 8)) and torch.allclose(probs[:, 2], torch.sigmoid(logits[:, 2]))
    perfect = torch.zeros(1, 3, 8, 8)
    perfect[:, 0], perfect[:, 1], perfect[:, 2] = 20.0, -20.0, -20.0  # confident background, distance 0
    loss = DistanceTargetLoss(SegmentationLoss("dice+ce"))
    assert loss(perfect, torch.zeros(1, 8, 8, dtype=torch.long)) < loss(perfect, torch.full((1, 8, 8), 200))
    metrics = run_evaluate(data, tmp_path / "run", tmp_path / "eval", EvaluateConfig(mpp=0.25))
    assert metrics["settings"]["target"] == "distance" and metrics["summary"]["aji"]["n"] == 4  # every image (no split file)
    segmentation = load_segmentation_model(tmp_path / "run")
    assert segmentation.finds_instances and segmentation.mask_classes == ["background", "class_1"]
    out = segmentation.predict(np.zeros((1, 32, 32, 3), np.uint8))
    assert out.shape == (1, 3, 32, 32) and np.allclose(out[:, :2].sum(1), 1.0, atol=1e-5)


def test_target_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs --classes 2"):
        FinetuneConfig(target="distance", classes=3)
    with pytest.raises(ConfigError, match="--target must be one of"):
        FinetuneConfig(target="watershed")
    with pytest.raises(ConfigError, match="needs --classes 2"):
        FinetuneConfig(target="contour", classes=3)
    with pytest.raises(ConfigError, match="--boundary-um must be a positive"):
        FinetuneConfig(target="contour", boundary_um=0)
    data = _touching_nuclei_dataset(tmp_path / "data")  # PNGs record no resolution
    with pytest.raises(ConfigError, match=r"--target contour \(--boundary-um 2.0\) needs the resolution.*--mpp"):
        run_finetune(data, tmp_path / "run", FinetuneConfig(**FAST | {"target": "contour"}), pretrained=None)


def _finetune_args(data: Path, run: Path, epochs: int) -> list[str]:
    """The CLI form of FAST, from scratch."""
    return ["finetune", str(data), "-o", str(run), "--pretrained", "none", "--model", "tiny", "--init", "pytorch",
            "--epochs", str(epochs), "--batch-size", "4", "--patch-px", "32", "--crops-per-image", "4", "--lr", "2e-3",
            "--val-fraction", "0.25", "--seed", "0", "--device", "cpu"]


def test_sigkill_then_resume(tmp_path: Path) -> None:
    """kill -9 in the middle of a run, then --resume: it finishes, one metric line per epoch."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data, run, epochs = _toy_dataset(tmp_path / "data"), tmp_path / "run", 15
    command = [sys.executable, "-m", "gsd_wsi", "-q", *_finetune_args(data, run, epochs)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # a tiny model: threads only contend
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env=env)
    state = run / "checkpoint" / "state.pt"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if state.is_file() and torch.load(state, weights_only=True)["epoch"] >= 2:
                break
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = torch.load(state, weights_only=True)
    assert 2 <= killed_at["epoch"] < epochs, "the run ended before it was killed"
    assert not (run / "last").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = killed_at["step"] // killed_at["epoch"]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert [r["step"] for r in rows] == [steps_per_epoch * e for e in range(1, epochs + 1)]
    assert torch.load(state, weights_only=True)["epoch"] == epochs
    _, info = load_segmentation_network(run)
    assert info["val_dice"] == max(r["val_dice"] for r in rows)
    assert (run / "last" / "model.safetensors").is_file() and (run / "curves.png").is_file()


def test_resume_refusals(tmp_path: Path) -> None:
    data = _toy_dataset(tmp_path / "data")
    config = FinetuneConfig(**FAST | {"epochs": 1})
    with pytest.raises(RunFolderError, match="no run to resume"):
        run_finetune(data, tmp_path / "run", config, pretrained=None, resume=True)
    run_finetune(data, tmp_path / "run", config, pretrained=None)
    with pytest.raises(RunFolderError, match="give one"):
        run_finetune(data, tmp_path / "run", config, pretrained=None, resume=True, overwrite=True)
    with pytest.raises(RunFolderError, match=r"settings differ.*lr: run has 0.002, now 0.001"):
        run_finetune(data, tmp_path / "run", FinetuneConfig(**FAST | {"epochs": 1, "lr": 1e-3}), pretrained=None,
                     resume=True)
    other = CliRunner().invoke(app, [*_finetune_args(data, tmp_path / "run", 1), "--batch-size", "2", "--resume"])
    assert other.exit_code == 2 and "batch_size" in other.output
    run_finetune(data, tmp_path / "run", config, pretrained=None, resume=True)  # a finished run: nothing to redo
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    import shutil
    shutil.rmtree(tmp_path / "run" / "checkpoint")
    with pytest.raises(RunFolderError, match="no checkpoint"):
        run_finetune(data, tmp_path / "run", config, pretrained=None, resume=True)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted after epoch 2 of 4 and resumed: the same weights and losses as a run straight through."""
    from gsd_wsi.stages import finetune
    from gsd_wsi.train import checkpoint as ckpt

    data, config = _toy_dataset(tmp_path / "data"), FinetuneConfig(**FAST | {"epochs": 4, "device": "cpu"})
    run_finetune(data, tmp_path / "straight", config, pretrained=None)
    save = ckpt.save_checkpoint

    def interrupted(folder: Path, *args, **kwargs) -> Path:
        saved = save(folder, *args, **kwargs)
        if Path(folder).name == "checkpoint" and args[3]["epoch"] == 2:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(finetune.ckpt, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(data, tmp_path / "resumed", config, pretrained=None)
    monkeypatch.setattr(finetune.ckpt, "save_checkpoint", save)
    run_finetune(data, tmp_path / "resumed", config, pretrained=None, resume=True)
    straight, resumed = (ckpt.load_weights(tmp_path / name / "last", ema=False) for name in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
