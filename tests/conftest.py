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
