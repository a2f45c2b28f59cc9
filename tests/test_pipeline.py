"""`gsd-wsi run`: the whole loop as a pipeline file, and the shipped pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gsd_wsi.cli.main import app
from gsd_wsi.errors import ConfigError
from gsd_wsi.stages.pipeline import check_pipeline, run_pipeline

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
runner = CliRunner()

WHOLE_LOOP = """
name: loop
synthetic_slides:
  - {slide_id: a, width_px: 2048, height_px: 2048, mpp: 0.5, n_tissue_regions: 3, seed: 4}
  - {slide_id: b, fmt: tiff, width_px: 2048, height_px: 1536, mpp: 0.5, seed: 5}
cohort: {workers: 2}
tile: {mpp: 2.0, tile_px: 32, stain: none}
pretrain: {model: tiny, image_size: 32, batch_size: 4, steps: 2, val_fraction: 0, sample_every: 2,
           checkpoint_every: 2, sample_steps: 2, n_samples: 1}
labels: {synthetic_slide: a, mpp: 2.0, crop_px: 64, n_crops: 6}
finetune: {class_names: [background, gland], init: pytorch, epochs: 1, batch_size: 4, patch_px: 32,
           crops_per_image: 2, loss: dice+ce, lr: 0.001, mpp: 2.0}
segment: {batch_size: 16}
"""


@pytest.fixture(scope="module")
def loop_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loop")
    (root / "loop.yaml").write_text(WHOLE_LOOP)
    result = runner.invoke(app, ["run", str(root / "loop.yaml"), "-o", str(root / "out")])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    return root / "loop.yaml", root / "out"


def test_the_whole_loop_runs_and_reports(loop_out: tuple[Path, Path], chromium_page) -> None:
    pipeline, out = loop_out
    assert (out / "pretrain" / "model" / "model.safetensors").is_file()
    assert len(list((out / "labels" / "images").iterdir())) == 6
    model_json = json.loads((out / "finetune" / "model" / "model.json").read_text())
    assert model_json["classes"] == ["background", "gland"] and model_json["mpp"] == 2.0
    for sid in ("a", "b"):
        stages = json.loads((out / "cohort" / sid / "status.json").read_text())["stages"]
        assert stages["tile"]["status"] == "done" and stages["segment"]["status"] == "done"
        assert (out / "cohort" / sid / "segment" / "mask.ome.zarr").is_dir()
    chromium_page.open(out / "cohort" / "report.html")
    assert chromium_page.page.locator("tr.slide").count() == 2
    assert "loop" in chromium_page.page.title()
    assert chromium_page.errors == []

    again = run_pipeline(pipeline, out)  # everything finished is kept
    assert again.segment is not None and again.segment.count("skipped") == 2


def test_cohort_segment_pipeline_with_overrides(loop_out: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = loop_out
    result = runner.invoke(app, [
        "run", str(PIPELINES / "cohort-segment.yaml"), "-o", str(tmp_path / "masks"),
        "--set", f"slides=[{out / 'slides'}]", "--set", f"segment.model={out / 'finetune'}",
        "--set", "tile.mpp=2.0", "--set", "tile.tile_px=32", "--set", "cohort.workers=1"])
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "masks" / "cohort" / "cohort_summary.csv").read_text().splitlines()
    statuses = [line.split(",")[1:3] for line in summary[1:]]
    # tiled by the first cohort call, kept by the second (tile + segment)
    assert sorted(statuses) == [["segment", "done"]] * 2 + [["tile", "skipped"]] * 2


@pytest.mark.parametrize("name", ["demo.yaml", "monuseg.yaml", "cohort-segment.yaml"])
def test_shipped_pipelines_are_valid(name: str) -> None:
    check_pipeline(PIPELINES / name)


def test_a_late_typo_fails_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(WHOLE_LOOP.replace("epochs: 1", "epoch: 1"))
    with pytest.raises(ConfigError, match="finetune: unknown setting"):
        run_pipeline(tmp_path / "p.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_monuseg_pipeline_takes_only_the_training_images(monuseg_dir: Path) -> None:
    from gsd_wsi.datasets import read_split_file
    from gsd_wsi.stages.pipeline import _labelled_images, load_pipeline

    path = PIPELINES / "monuseg.yaml"
    data = load_pipeline(path, [f"labelled_data={monuseg_dir}"])
    images = _labelled_images(path, data, "train")
    split = read_split_file(PIPELINES / "monuseg_split.json")
    assert len(images) == len(split["train"]) and not {p.stem for p in images} & set(split["test"])


def test_slide_entries_with_their_own_model_and_optional_files(loop_out: tuple[Path, Path], slides_dir: Path,
                                                              tmp_path: Path) -> None:
    """A ``slides`` mapping gives one slide its own model (the built-in nuclei model beside the
    pipeline's gland model), and an optional slide that is not there is skipped, not failed."""
    _, out = loop_out
    (tmp_path / "p.yaml").write_text(f"""
name: mixed
slides:
  - {out / 'slides' / 'a.svs'}
  - {{path: {slides_dir / 'CMU-1-Small-Region.svs'}, model: nuclei}}
  - {{path: {tmp_path / 'not-here.svs'}, optional: true}}
cohort: {{workers: 1}}
segment: {{model: {out / 'finetune'}, batch_size: 16, tta: false}}
""")
    result = run_pipeline(tmp_path / "p.yaml", tmp_path / "out")
    assert result.segment is not None and result.segment.count("done") == 2 and result.segment.count("failed") == 0
    glands = json.loads((tmp_path / "out" / "cohort" / "a" / "segment" / "summary.json").read_text())
    nuclei = json.loads((tmp_path / "out" / "cohort" / "CMU-1-Small-Region" / "segment" / "summary.json").read_text())
    assert "nuclei" not in glands and "gland" in glands["class_mm2"]
    assert nuclei["nuclei"]["count"] > 500 and "nuclei-20x" in nuclei["model"]["path"]


def test_slide_entries_are_checked(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("slides:\n  - {path: x.svs, modle: nuclei}\nsegment: {}\n")
    with pytest.raises(ConfigError, match=r"slides\[0\]: unknown setting"):
        check_pipeline(tmp_path / "p.yaml")
