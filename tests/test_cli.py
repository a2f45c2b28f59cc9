"""The `gsd-wsi` command end to end, as a user runs it."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from gsd_wsi.cli.main import app
from gsd_wsi.store import PatchStore

runner = CliRunner()


def test_tile_command_end_to_end(synthetic_tiff, slides_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["tile", str(synthetic_tiff.path), str(slides_dir / "broken.svs"), "-o", str(out),
                                 "--tile-px", "128", "--stain", "vahadane", "--workers", "2"])
    assert result.exit_code == 1, result.output  # one slide failed
    assert "1 of 2 slide(s) failed" in result.output
    with (out / "tile_summary.csv").open() as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert rows["synth"]["status"] == "ok" and rows["broken"]["status"] == "failed"
    store = PatchStore(out / "synth" / "patches.zarr")
    assert store.attrs["stain"]["method"] == "vahadane" and len(store) == int(rows["synth"]["n_patches"])

    again = runner.invoke(app, ["tile", str(synthetic_tiff.path), "-o", str(out), "--tile-px", "128",
                                "--stain", "vahadane"])
    assert again.exit_code == 0 and "skipped" in again.output


def test_bad_option_is_one_clear_line(synthetic_tiff, tmp_path: Path) -> None:
    result = runner.invoke(app, ["tile", str(synthetic_tiff.path), "-o", str(tmp_path), "--stride-px", "999"])
    assert result.exit_code == 2
    assert "error:" in result.output and "--stride-px" in result.output
    assert "Traceback" not in result.output


def test_run_pipeline_and_synth(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        "name: t\nsynthetic_slides:\n  - {slide_id: s, width_px: 2048, height_px: 1536, mpp: 0.5, seed: 2}\n"
        "cohort: {workers: 1}\n"
        "tile: {tile_px: 32, stain: reinhard}\n"
        "pretrain: {model: tiny, image_size: 32, batch_size: 4, steps: 2, num_workers: 0, val_fraction: 0,\n"
        "           sample_every: 2, checkpoint_every: 2, sample_steps: 2, n_samples: 1}\n"
    )
    result = runner.invoke(app, ["run", str(pipeline), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "tiled 1 slide(s) (done 1)" in result.output
    assert (tmp_path / "out" / "cohort" / "s" / "tile" / "tissue.png").is_file()
    assert "pretrained U-Net" in result.output and "report:" in result.output
    assert (tmp_path / "out" / "pretrain" / "model" / "model.safetensors").is_file()
    again = runner.invoke(app, ["run", str(pipeline), "-o", str(tmp_path / "out")])
    assert again.exit_code == 0 and "skipped 1" in again.output  # finished work is kept
    changed = runner.invoke(app, ["run", str(pipeline), "-o", str(tmp_path / "out"), "--set", "tile.tile_px=64"])
    assert changed.exit_code == 2 and "--overwrite" in changed.output  # other settings: refused, not mixed
    bad = tmp_path / "bad.yaml"
    bad.write_text("tile: {tile_pixels: 3}\n")
    result = runner.invoke(app, ["run", str(bad), "-o", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "unknown setting" in result.output
    result = runner.invoke(app, ["run", str(pipeline), "-o", str(tmp_path / "o3"), "--set", "tile"])
    assert result.exit_code == 2 and "section.key=value" in result.output

    result = runner.invoke(app, ["synth", str(tmp_path / "x.tiff"), "--width-px", "1024", "--height-px", "768"])
    assert result.exit_code == 0 and (tmp_path / "x.tiff").is_file()


def test_installed_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "gsd_wsi", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("gsd-wsi ")


def test_cohort_summary_lists_only_slides_needing_a_look(tmp_path: Path, capsys) -> None:
    from gsd_wsi.cli import main as cli_main
    from gsd_wsi.stages.tile import SlideResult

    results = [SlideResult(f"s{i:02d}", tmp_path / f"s{i}.svs", "ok", 10, 1.0) for i in range(30)]
    results[7] = SlideResult("s07", tmp_path / "s07.svs", "failed", error="corrupt")
    with cli_main.console.capture() as captured:
        cli_main._print_results(results, tmp_path)
    text = captured.get()
    assert "s07" in text and "corrupt" in text and "s08" not in text
    assert "ok 29" in text and "failed 1" in text
