"""Shared fixtures: paths to the real data beside the project, skipped when absent; a
headless Chromium page for tests of the HTML report."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    from gsd_wsi.train.pretrain_config import PretrainConfig
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


# -- a headless browser (Debian's Chromium driven by Playwright; no browser download) --------

CHROMIUM = Path(os.environ.get("GSD_WSI_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
_LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


@dataclass
class BrowserPage:
    """A Playwright page plus what went wrong on it: console errors, uncaught exceptions and
    requests that would leave the machine (the report must need no network)."""

    page: Any  # playwright.sync_api.Page
    errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)

    def open(self, path: Path) -> None:
        """Load a file by its ``file://`` URL and wait until it and its images are loaded."""
        self.page.goto(Path(path).resolve().as_uri(), wait_until="load")


@pytest.fixture(scope="session")
def chromium_browser() -> Iterator[Any]:
    """One headless Chromium for the session; skipped where Chromium or Playwright is absent."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set GSD_WSI_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def chromium_page(chromium_browser: Any) -> Iterator[BrowserPage]:
    """A fresh 1400x900 page that records console errors, page errors and non-local requests::

        def test_page(chromium_page, tmp_path):
            chromium_page.open(tmp_path / "report.html")
            assert chromium_page.page.locator("tr.slide").count() == 5
            assert chromium_page.errors == [] and chromium_page.external_requests == []
    """
    context = chromium_browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    watched = BrowserPage(page)
    page.on("console", lambda msg: watched.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: watched.errors.append(f"pageerror: {exc}"))
    page.on("request", lambda req: None if req.url.startswith(_LOCAL_SCHEMES)
            else watched.external_requests.append(req.url))
    try:
        yield watched
    finally:
        context.close()
