"""`gsd-wsi tile` as a library call: stores, resume, settings changes, failure isolation."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gsd_wsi.errors import ConfigError, OutputError
from gsd_wsi.slide import open_slide
from gsd_wsi.stages import tile as tile_module
from gsd_wsi.stages.tile_batch import SUMMARY_NAME, run_tile
from gsd_wsi.stages.tile_config import TileConfig
from gsd_wsi.store import STORE_NAME, PatchStore
from gsd_wsi.stain import StainNormalizer
from gsd_wsi.synthetic import write_fluorescence_slide


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / SUMMARY_NAME).open() as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def tiled(synthetic_svs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("tiled")
    results = run_tile([synthetic_svs.path], out, TileConfig(mpp=0.5, tile_px=128, min_tissue=0.5))
    return out, results


def test_store_contents(tiled, synthetic_svs) -> None:
    out, results = tiled
    assert [r.status for r in results] == ["ok"]
    store = PatchStore(out / "synth" / STORE_NAME)
    n = len(store)
    assert n == results[0].n_patches > 20
    assert store[0].shape == (128, 128, 3)
    attrs = store.attrs
    for key in ("slide_path", "slide_id", "slide_mpp", "tile_mpp", "tile_px", "stride_px", "level", "stain",
                "gsd_wsi_version", "settings_hash", "settings"):
        assert key in attrs, key
    assert attrs["slide_mpp"] == 0.25 and attrs["tile_mpp"] == 0.5 and attrs["level"] == 0 and attrs["read_px"] == 256
    assert attrs["stain"]["method"] == "macenko" and "source" in attrs["stain"]
    assert (store.tissue_fraction >= 0.5).all()
    from PIL import Image

    with Image.open(out / "synth" / "tissue.png") as qc:
        assert qc.text["settings_hash"] == attrs["settings_hash"] and qc.text["Software"].startswith("gsd-wsi ")
    assert _summary(out)["synth"]["status"] == "ok"


def test_patches_are_the_normalised_slide_pixels(tiled, synthetic_svs) -> None:
    """Each patch equals the region at its coordinates, resized and normalised with the recorded parameters."""
    out, _ = tiled
    store = PatchStore(out / "synth" / STORE_NAME)
    normalizer = StainNormalizer.from_params(store.attrs["stain"])
    with open_slide(synthetic_svs.path) as slide:
        for i in (0, len(store) // 2, len(store) - 1):
            x, y = store.coords[i]
            raw = tile_module.read_tiles(slide, 0, np.array([[x, y]]), 256, 128)
            np.testing.assert_array_equal(store[i], normalizer.transform(raw)[0])


def test_rerun_skips_then_redoes_on_changed_settings(tiled, synthetic_svs) -> None:
    out, _ = tiled
    store_dir = out / "synth" / STORE_NAME
    before = PatchStore(store_dir).attrs["created"]
    again = run_tile([synthetic_svs.path], out, TileConfig(mpp=0.5, tile_px=128, min_tissue=0.5))
    assert again[0].status == "skipped"
    assert PatchStore(store_dir).attrs["created"] == before
    changed = run_tile([synthetic_svs.path], out, TileConfig(mpp=0.5, tile_px=128, min_tissue=0.8, stain="none"))
    assert changed[0].status == "ok"
    store = PatchStore(store_dir)
    assert store.attrs["min_tissue"] == 0.8 and store.attrs["stain"] == {"method": "none"}
    assert (store.tissue_fraction >= 0.8).all()
    forced = run_tile([synthetic_svs.path], out, TileConfig(mpp=0.5, tile_px=128, min_tissue=0.8, stain="none"),
                      overwrite=True)
    assert forced[0].status == "ok"


def test_two_workers_write_the_same_store(synthetic_tiff, tmp_path: Path) -> None:
    config = TileConfig(mpp=0.5, tile_px=128, min_tissue=0.3, stain="reinhard", shard_patches=8)
    one = run_tile([synthetic_tiff.path], tmp_path / "one", config, workers=1)
    two = run_tile([synthetic_tiff.path], tmp_path / "two", config, workers=2)
    assert one[0].status == two[0].status == "ok" and one[0].n_patches == two[0].n_patches
    assert one[0].n_patches > 8 * 8  # more than 8 shards: the slide is split over several jobs
    a, b = PatchStore(tmp_path / "one" / "synth" / STORE_NAME), PatchStore(tmp_path / "two" / "synth" / STORE_NAME)
    np.testing.assert_array_equal(a.read_range(0, len(a)), b.read_range(0, len(b)))
    np.testing.assert_array_equal(a.coords, b.coords)


@pytest.mark.parametrize("stain", ["none", "macenko"])
def test_fill_threads_write_the_same_store(synthetic_tiff, tmp_path: Path, stain: str) -> None:
    """Shards filled by several threads at once equal shards filled one after another."""
    from gsd_wsi.manifest import collect_inputs

    item = collect_inputs([synthetic_tiff.path], None)[0]
    config = TileConfig(mpp=0.5, tile_px=128, min_tissue=0.3, stain=stain, shard_patches=8)
    reported = []
    for threads in (1, 3):
        plan = tile_module.plan_slide(item, tmp_path / f"t{threads}", config, None)
        assert isinstance(plan, tile_module.SlidePlan) and len(plan.shards) > 6
        counts: list[int] = []
        n = tile_module.fill_shards(plan, list(range(len(plan.shards))), tile_module.planned_read_xy(plan),
                                    on_shard=counts.append, threads=threads)
        assert n == sum(counts) == plan.n_patches
        assert tile_module.finish_slide(plan).status == "ok"
        reported.append(sorted(counts))
    assert reported[0] == reported[1]
    a, b = (PatchStore(tmp_path / f"t{t}" / "synth" / STORE_NAME) for t in (1, 3))
    np.testing.assert_array_equal(a.read_range(0, len(a)), b.read_range(0, len(b)))


def test_a_failing_shard_fails_the_fill(synthetic_tiff, tmp_path: Path, monkeypatch) -> None:
    from gsd_wsi.manifest import collect_inputs

    item = collect_inputs([synthetic_tiff.path], None)[0]
    plan = tile_module.plan_slide(item, tmp_path, TileConfig(tile_px=128, stain="none", shard_patches=8), None)
    calls = []
    real_read_tiles = tile_module.read_tiles

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk went away")
        return real_read_tiles(*args, **kwargs)

    monkeypatch.setattr(tile_module, "read_tiles", failing)
    with pytest.raises(OSError, match="disk went away"):
        tile_module.fill_shards(plan, list(range(len(plan.shards))), tile_module.planned_read_xy(plan), threads=2)
    tile_module.abandon_slide(plan)


def test_failures_are_isolated(synthetic_tiff, slides_dir: Path, tmp_path: Path) -> None:
    blank = tmp_path / "in" / "blank.tif"
    blank.parent.mkdir()
    tifffile.imwrite(blank, np.full((1024, 1024, 3), 245, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", metadata=None)
    sources = [synthetic_tiff.path, slides_dir / "broken.svs", slides_dir / "small.svs", slides_dir / "boxes.tiff",
               tmp_path / "missing.svs", blank]
    results = run_tile(sources, tmp_path / "out", TileConfig(tile_px=128, stain="macenko"), workers=2)
    status = {r.slide_id: r.status for r in results}
    assert status == {"synth": "ok", "broken": "failed", "small": "failed", "boxes": "failed",
                      "missing": "failed", "blank": "no_tissue"}
    errors = {r.slide_id: r.error for r in results}
    assert "corrupt" in errors["broken"] and "smaller than one" in errors["small"]
    assert "--slide-mpp" in errors["boxes"] and "no such file" in errors["missing"]
    assert all("\n" not in e for e in errors.values())
    assert len(PatchStore(tmp_path / "out" / "blank" / STORE_NAME)) == 0
    summary = _summary(tmp_path / "out")
    assert summary["broken"]["status"] == "failed" and summary["synth"]["n_patches"] == str(results[0].n_patches)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]


def test_crash_leaves_no_finished_looking_output(synthetic_tiff, tmp_path: Path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # an interruption mid-slide, not an ordinary failure

    monkeypatch.setattr("gsd_wsi.stages.tile.fill_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        run_tile([synthetic_tiff.path], tmp_path, TileConfig(tile_px=128, stain="none"))
    assert not (tmp_path / "synth").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers  # the interrupted work is there, under a name no reader takes
    monkeypatch.undo()
    results = run_tile([synthetic_tiff.path], tmp_path, TileConfig(tile_px=128, stain="none"))
    assert results[0].status == "ok"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_duplicate_ids_fail_only_those(synthetic_tiff, tmp_path: Path) -> None:
    copy = tmp_path / "other" / "synth.tiff"
    copy.parent.mkdir()
    copy.write_bytes(synthetic_tiff.path.read_bytes())
    results = run_tile([synthetic_tiff.path, copy], tmp_path / "out", TileConfig(tile_px=128, stain="none"))
    assert [r.status for r in results] == ["failed", "failed"]
    assert "shared by" in results[0].error


def test_fluorescence_slide_is_refused(synthetic_tiff, tmp_path: Path) -> None:
    dapi = write_fluorescence_slide(tmp_path / "in" / "dapi.tiff")
    results = run_tile([synthetic_tiff.path, dapi], tmp_path / "out", TileConfig(tile_px=128, stain="macenko"))
    assert [(r.slide_id, r.status) for r in results] == [("synth", "ok"), ("dapi", "failed")]
    assert "expects brightfield H&E" in results[1].error and "near-black" in results[1].error
    assert results[0].n_patches > 0 and _summary(tmp_path / "out")["dapi"]["status"] == "failed"
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["synth"]  # nothing for dapi


@pytest.mark.parametrize(
    "kwargs, match",
    [({"tile_px": 0}, "tile-px"), ({"stride_px": 300}, "stride"), ({"min_tissue": 1.5}, "min-tissue"),
     ({"stain": "magic"}, "stain"), ({"mpp": -1}, "mpp")],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TileConfig(**kwargs)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_non_root(synthetic_tiff, tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="cannot write"):
        run_tile([synthetic_tiff.path], locked / "out", TileConfig())


def test_unwritable_output(synthetic_tiff, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        run_tile([synthetic_tiff.path], not_a_folder / "out", TileConfig())


def test_second_run_on_same_output_is_refused(synthetic_tiff, tmp_path: Path) -> None:
    import fcntl

    with open(tmp_path / ".gsd-wsi-tile.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(OutputError, match="another gsd-wsi run"):
            run_tile([synthetic_tiff.path], tmp_path, TileConfig())


def test_real_slides(slides_dir: Path, tmp_path: Path) -> None:
    results = {r.slide_id: r for r in run_tile([slides_dir], tmp_path, TileConfig())}
    assert results["CMU-1-Small-Region"].status == "ok" and results["CMU-1-Small-Region"].n_patches > 20
    assert results["broken"].status == "failed"
    store = PatchStore(tmp_path / "CMU-1-Small-Region" / STORE_NAME)
    assert store.attrs["slide_mpp"] == pytest.approx(0.499) and store.attrs["reader"] == "tifffile"


def test_worker_warnings_reach_the_parent_log(slides_dir: Path, synthetic_tiff, tmp_path: Path, caplog) -> None:
    """A warning raised inside a worker process is shown to the user like any other."""
    import logging

    caplog.set_level(logging.INFO, logger="gsd_wsi")
    results = run_tile([slides_dir / "boxes.tiff", synthetic_tiff.path], tmp_path, TileConfig(tile_px=128),
                       workers=2, slide_mpp=0.5)
    assert {r.slide_id: r.status for r in results}["synth"] == "ok"
    assert any("placeholder" in record.getMessage() for record in caplog.records)


def test_stain_target_image_and_its_hash(synthetic_tiff, monuseg_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    target = tmp_path / "target.png"
    with tifffile.TiffFile(sorted((monuseg_dir / "images").glob("*.tif"))[0]) as tif:
        Image.fromarray(tif.pages.first.asarray()[:512, :512]).save(target)
    config = TileConfig(tile_px=128, stain="macenko", stain_target=target)
    first = run_tile([synthetic_tiff.path], tmp_path / "out", config)
    stain = PatchStore(tmp_path / "out" / "synth" / STORE_NAME).attrs["stain"]
    builtin = run_tile([synthetic_tiff.path], tmp_path / "builtin", TileConfig(tile_px=128, stain="macenko"))
    builtin_stain = PatchStore(tmp_path / "builtin" / "synth" / STORE_NAME).attrs["stain"]
    assert first[0].status == builtin[0].status == "ok"
    assert stain["target"] != builtin_stain["target"]  # fitted from the image, not the built-in reference
    # Another target image with the same name is a settings change: the store is redone.
    with tifffile.TiffFile(sorted((monuseg_dir / "images").glob("*.tif"))[1]) as tif:
        Image.fromarray(tif.pages.first.asarray()[:512, :512]).save(target)
    assert run_tile([synthetic_tiff.path], tmp_path / "out", config)[0].status == "ok"
    assert run_tile([synthetic_tiff.path], tmp_path / "out", config)[0].status == "skipped"


def test_manifest_gives_resolution_to_a_slide_without_one(slides_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"path,slide_id,mpp\n{slides_dir / 'boxes.tiff'},boxes-at-half,0.5\n")
    results = run_tile([manifest], tmp_path / "out", TileConfig(tile_px=64, stain="none", min_tissue=0.0))
    assert results[0].slide_id == "boxes-at-half" and results[0].status == "ok"
    store = PatchStore(tmp_path / "out" / "boxes-at-half" / STORE_NAME)
    assert store.attrs["slide_mpp"] == 0.5 and len(store) == (300 // 64) * (250 // 64)
