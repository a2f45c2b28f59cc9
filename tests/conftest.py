"""Shared fixtures: paths to the real data beside the project, skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (a checkout without ../shared)")
    return path


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    """../shared/data/slides: real slides (CMU-1-Small-Region.svs, small.svs, boxes.tiff, broken.svs)."""
    return _require(SHARED_DATA / "slides")


@pytest.fixture(scope="session")
def monuseg_dir() -> Path:
    """../shared/data/monuseg-train: MoNuSeg training images, masks and XML annotations."""
    return _require(SHARED_DATA / "monuseg-train")


@pytest.fixture(scope="session")
def synthetic_svs(tmp_path_factory: pytest.TempPathFactory):
    """A 4096x3072 Aperio-style SVS at 0.25 um/px with pen marks and a faint region."""
    from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(width_px=4096, height_px=3072, mpp=0.25, fmt="svs", pen_marks=True,
                              faint_region=True, seed=3)
    return write_synthetic_slide(tmp_path_factory.mktemp("svs") / "synth.svs", spec)


@pytest.fixture(scope="session")
def synthetic_tiff(tmp_path_factory: pytest.TempPathFactory):
    """A 3072x2048 generic tiled TIFF at 0.5 um/px."""
    from gsd_wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(width_px=3072, height_px=2048, mpp=0.5, fmt="tiff", file_tile_px=240, seed=5)
    return write_synthetic_slide(tmp_path_factory.mktemp("tiff") / "synth.tiff", spec)


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny pretraining run on two random 32-px stores (for fine-tuning tests)."""
    import numpy as np

    from gsd_wsi.stages.pretrain import run_pretrain
    from gsd_wsi.stages.pretrain_config import PretrainConfig
    from gsd_wsi.store import create_store, open_images_for_writing, shard_ranges

    root = tmp_path_factory.mktemp("pretrained")
    rng = np.random.default_rng(0)
    for slide in ("a", "b"):
        images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
        coords = np.stack([np.arange(24) * 32, np.zeros(24)], axis=1).astype(np.int64)
        path = root / "tiles" / slide / "patches.zarr"
        create_store(path, coords, np.ones(24), 32, {"slide_id": slide, "tile_px": 32}, shard_patches=8)
        writer = open_images_for_writing(path)
        for start, stop in shard_ranges(24, 8):
            writer[start:stop] = images[start:stop]
    config = PretrainConfig(model="tiny", image_size=32, batch_size=4, steps=2, num_workers=0, sample_every=2,
                            sample_steps=2, n_samples=1, val_patches=4, init="pytorch")
    return run_pretrain([root / "tiles"], root / "run", config).root
