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
