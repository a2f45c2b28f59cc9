"""pipelines/monuseg_experiment.py: the table it writes from the evaluations (mean, sample std, paired difference)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "pipelines" / "monuseg_experiment.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("monuseg_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _fake_eval(out: Path, name: str, dice: float, aji: float) -> None:
    folder = out / "eval" / name
    folder.mkdir(parents=True)
    summary = {"dice": {"mean": dice}, "aji": {"mean": aji}, "pq": {"mean": aji / 2}, "hd95_um": {"mean": 10 * dice}}
    (folder / "metrics.json").write_text(json.dumps({"summary": summary}))
    model = out / "finetune" / name / "model"
    model.mkdir(parents=True)
    (model / "model.json").write_text(json.dumps({"val_dice": dice + 0.01, "val_aji": aji + 0.01}))


def test_summary_table(tmp_path: Path, experiment) -> None:
    args = experiment.parse_args(["--out", str(tmp_path), "--seeds", "0", "1", "2", "--fractions", "1.0", "0.1",
                                  "--targets", "contour"])
    runs = [experiment.FinetuneRun("contour", start, f, s) for f in args.fractions for s in args.seeds
            for start in ("pretrained", "scratch")]
    pre = {0: 0.70, 1: 0.74, 2: 0.72}
    for run in runs:
        offset = 0.05 if run.fraction == 0.1 and run.start == "pretrained" else 0.0
        _fake_eval(tmp_path, run.name, pre[run.seed] + offset - (0.1 if run.fraction == 0.1 else 0.0), 0.3)
    assert runs[0].name == "contour_pretrained_f100_s0" and runs[-1].name == "contour_scratch_f010_s2"
    result = experiment.summarise(args, tmp_path, runs, {"tile": 1.0})
    table = result["table"]
    assert table["contour/scratch@1"]["dice"]["mean"] == pytest.approx(0.72)
    assert table["contour/scratch@1"]["dice"]["std"] == pytest.approx(0.02)  # sample std (n - 1) over seeds
    assert table["contour/difference@0.1"]["dice"]["mean"] == pytest.approx(0.05)
    assert table["contour/difference@0.1"]["dice"]["std"] == pytest.approx(0.0, abs=1e-12)  # paired by seed
    assert table["contour/difference@1"]["aji"]["per_seed"] == pytest.approx([0.0, 0.0, 0.0])
    assert result["per_run"]["contour_scratch_f100_s1"]["val_aji"] == pytest.approx(0.31)  # validation, for choices
    experiment.write_markdown(result, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "| contour | 10% | pretrained − scratch (paired) | +0.050 ± 0.000 |" in text
    assert "| contour | 100% | scratch | 0.720 ± 0.020 |" in text
    assert text.startswith("MoNuSeg, 6 test images (TCGA-50-5931-01Z-00-DX1, TCGA-B0-5710-01Z-00-DX1, ")
    assert "TCGA-NH-A8F7-01A-01-TS1), 24 training images; tiny U-Net" in text
    experiment.plot(result, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_results_name_the_split_they_were_made_on(tmp_path: Path, experiment) -> None:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"note": "a smaller split", "train": ["a", "b", "c"], "val": ["v"], "test": ["t1", "t2"]}))
    args = experiment.parse_args(["--out", str(tmp_path), "--split-file", str(split), "--seeds", "0", "--fractions", "1.0",
                                  "--targets", "semantic", "--starts", "scratch"])
    runs = [experiment.FinetuneRun("semantic", "scratch", 1.0, 0)]
    for run in runs:
        _fake_eval(tmp_path, run.name, 0.7, 0.3)
    result = experiment.summarise(args, tmp_path, runs, {})
    assert result["split"] == {"train": ["a", "b", "c"], "val": ["v"], "test": ["t1", "t2"]}
    experiment.write_markdown(result, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("MoNuSeg, 2 test images (t1, t2), 3 training images, 1 validation image; tiny U-Net")
    assert "6 test images" not in text and "24 training" not in text
    # one seed has no spread to show, and one start no difference
    assert "| semantic | 100% | scratch | 0.700 | 0.300 |" in text and "±" not in text and "paired" not in text
    assert "one seed, 0 (gsd-wsi" in text
    experiment.plot(result, tmp_path / "results.png")
    assert experiment.describe_split({"train": ["a"], "test": ["t"]}) == "1 test image (t), 1 training image"


def test_mean_std_skips_missing_values(experiment) -> None:
    assert experiment._mean_std([1.0, None, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    mean, std = experiment._mean_std([None])
    assert math.isnan(mean) and math.isnan(std)
