"""Built-in models: which member of a family serves a resolution, the refusals, and the shipped
models themselves (package data) on real images and the real slide."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gsd_wsi import zoo
from gsd_wsi.errors import ConfigError


def _fake_model(root: Path, name: str, mpp: float) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({
        "mpp": mpp, "classes": ["background", "nucleus", "distance"], "target": {"kind": "distance"},
        "builtin": {"name": name, "family": "nuclei", "licence": "CC BY-NC-SA 4.0", "validation": {"aji": 0.5}}}))
    (folder / "model.safetensors").write_bytes(b"0" * 10)


@pytest.fixture
def fake_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _fake_model(tmp_path, "nuclei-40x", 0.2527)
    _fake_model(tmp_path, "nuclei-20x", 0.5)
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    return tmp_path


def test_family_member_is_the_finest_not_finer_than_the_slide(fake_zoo: Path) -> None:
    assert [m.name for m in zoo.builtin_models()] == ["nuclei-40x", "nuclei-20x"]
    assert zoo.builtin_names() == ["nuclei", "nuclei-40x", "nuclei-20x"]
    assert zoo.builtin_for_mpp("nuclei", 0.2527).name == "nuclei-40x"
    assert zoo.builtin_for_mpp("nuclei", 0.25).name == "nuclei-40x"       # finer: brought down to 40x
    assert zoo.builtin_for_mpp("nuclei", 0.2465).name == "nuclei-40x"
    assert zoo.builtin_for_mpp("nuclei", 0.257).name == "nuclei-40x"      # within segment's 2 % of 0.2527
    assert zoo.builtin_for_mpp("nuclei", 0.263).name == "nuclei-20x"
    assert zoo.builtin_for_mpp("nuclei", 0.3).name == "nuclei-20x"        # 40x would upsample it
    assert zoo.builtin_for_mpp("nuclei", 0.499).name == "nuclei-20x"
    assert zoo.builtin_for_mpp("nuclei-40x", 0.5).name == "nuclei-40x"    # a member by name, whatever the slide


def test_refusals_say_what_would_work(fake_zoo: Path) -> None:
    with pytest.raises(ConfigError, match=r"coarser than every built-in nuclei model .*0\.5 um/px"):
        zoo.builtin_for_mpp("nuclei", 0.52)
    with pytest.raises(ConfigError, match="resolution is unknown"):
        zoo.builtin_for_mpp("nuclei", None)
    with pytest.raises(ConfigError, match="nuclei, nuclei-40x, nuclei-20x"):
        zoo.builtin_name_of("nucleus")
    assert zoo.builtin_name_of("nuclei") == "nuclei"
    assert zoo.builtin_name_of("runs/seg") is None                          # a path, checked where it is used


def test_an_existing_folder_wins_over_a_builtin_name(fake_zoo: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    (work / "nuclei").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert zoo.builtin_name_of("nuclei") is None


# -- the shipped models ------------------------------------------------------------------------

def test_shipped_models_are_complete_small_and_licensed() -> None:
    models = zoo.builtin_models()
    assert {m.family for m in models} == {"nuclei"}
    assert sum(m.size_bytes for m in models) <= 20e6
    for model in models:
        assert (model.folder / "model.safetensors").is_file()
        assert model.licence == "CC BY-NC-SA 4.0"
        info = json.loads((model.folder / "model.json").read_text())
        assert info["postprocess"]["kind"] == "distance" and info["target"]["kind"] == "distance"
        assert {"dice", "aji", "pq"} <= set(model.validation)
        assert "pipelines/nuclei_model.py" in model.record["command"]


def test_models_command_lists_them() -> None:
    out = subprocess.run([sys.executable, "-m", "gsd_wsi", "models"], capture_output=True, text=True, check=True)
    for model in zoo.builtin_models():
        assert model.name in out.stdout
    assert "CC BY-NC-SA 4.0" in out.stdout


def test_evaluate_builtin_on_a_monuseg_style_folder(monuseg_dir: Path, tmp_path: Path) -> None:
    """name.tif beside name.xml, the resolution read from the XML: how the model is scored on
    unseen test images. One training image (the model saw it, so this is a floor, not a score)."""
    folder = tmp_path / "images"
    folder.mkdir()
    name = "TCGA-21-5784-01Z-00-DX1"
    shutil.copy(monuseg_dir / "images" / f"{name}.tif", folder / f"{name}.tif")
    shutil.copy(monuseg_dir / "annotations" / f"{name}.xml", folder / f"{name}.xml")
    out = tmp_path / "eval"
    subprocess.run([sys.executable, "-m", "gsd_wsi", "evaluate", str(folder), "--model", "nuclei", "-o", str(out),
                    "--no-tta"], check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["mpp_source"] == "the images' XML"
    assert metrics["settings"]["model_mpp"] == pytest.approx(0.2527)
    assert metrics["summary"]["dice"]["mean"] > 0.7 and metrics["summary"]["aji"]["mean"] > 0.45


def test_segment_a_real_slide_with_no_model_option(slides_dir: Path, tmp_path: Path) -> None:
    """The promise of the README: `gsd-wsi segment slide.svs -o out`, nothing else, finds the
    nuclei of a real 20x H&E slide with the built-in model picked for its resolution."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "gsd_wsi", "segment", str(slides_dir / "CMU-1-Small-Region.svs"),
                          "-o", str(out), "--no-tta"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    slide = out / "CMU-1-Small-Region"
    summary = json.loads((slide / "summary.json").read_text())
    assert summary["model"]["path"].endswith("nuclei-20x")
    nuclei = summary["nuclei"]
    assert nuclei["count"] > 500 and 10 < nuclei["mean_area_um2"] < 80   # nuclei, not specks or blobs
    geojson = json.loads((slide / "mask.geojson").read_text())
    detections = [f for f in geojson["features"] if f["properties"].get("objectType") == "detection"]
    assert len(detections) == nuclei["count"]
    assert (slide / "instances.ome.zarr").is_dir()


def test_builtin_refusals_are_one_line(slides_dir: Path, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "gsd_wsi", "segment", str(slides_dir / "CMU-1-Small-Region.svs"),
                          "-o", str(tmp_path / "a"), "--model", "nucleus"], capture_output=True, text=True)
    assert run.returncode == 2 and "nuclei, nuclei-" in run.stdout + run.stderr
    # a 20x slide is coarser than the 40x model named alone: that slide fails, with what would work
    run = subprocess.run([sys.executable, "-m", "gsd_wsi", "segment", str(slides_dir / "CMU-1-Small-Region.svs"),
                          "-o", str(tmp_path / "b"), "--model", "nuclei-40x"], capture_output=True, text=True)
    assert run.returncode == 1
    assert "coarser" in (tmp_path / "b" / "segment_summary.csv").read_text()


def test_finetune_from_the_builtin_keeps_its_head(monuseg_dir: Path, tmp_path: Path) -> None:
    from gsd_wsi.stages.finetune import FinetuneConfig, run_finetune

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    name = "TCGA-18-5592-01Z-00-DX1"
    shutil.copy(monuseg_dir / "images" / f"{name}.tif", data / "images")
    shutil.copy(monuseg_dir / "masks" / f"{name}.png", data / "masks")
    config = FinetuneConfig(class_names=("background", "nucleus"), target="distance", epochs=1, batch_size=2,
                            patch_px=128, crops_per_image=2, val_fraction=0.0, mpp=0.2527, loss="dice+ce")
    run_finetune(data, tmp_path / "run", config, "nuclei")
    provenance = json.loads((tmp_path / "run" / "config.json").read_text())["pretrained"]
    assert provenance["builtin"] == "nuclei-40x" and provenance["reinitialised"] == []


def test_monuseg_images_brought_to_20x_keep_their_nuclei(monuseg_dir: Path, tmp_path: Path) -> None:
    """pipelines/monuseg_at_mpp.py: the image halved, every polygon with it, the XML's resolution
    doubled; the instances read back are the 40x ones halved (same count, a quarter of the area)."""
    import numpy as np

    from gsd_wsi.datasets import discover, load_instance_example

    script = Path(__file__).resolve().parents[1] / "pipelines" / "monuseg_at_mpp.py"
    name = "TCGA-21-5784-01Z-00-DX1"
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(monuseg_dir / "images" / f"{name}.tif", source)
    shutil.copy(monuseg_dir / "annotations" / f"{name}.xml", source)
    subprocess.run([sys.executable, str(script), str(source), "-o", str(tmp_path / "20x"), "--mpp", "0.5054"],
                   check=True, capture_output=True)
    (full,), _ = discover(source)
    (half,), _ = discover(tmp_path / "20x")
    image40, inst40, _ = load_instance_example(full)
    image20, inst20, _ = load_instance_example(half)
    assert image20.shape == (500, 500, 3) and image40.shape == (1000, 1000, 3)
    n40, n20 = len(np.unique(inst40)) - 1, len(np.unique(inst20)) - 1
    assert abs(n20 - n40) <= 0.02 * n40                       # a few of the smallest may vanish
    assert (inst20 > 0).mean() == pytest.approx((inst40 > 0).mean(), rel=0.05)
    assert "0.50" in (tmp_path / "20x" / f"{name}.xml").read_text()[:200]
