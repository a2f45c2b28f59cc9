"""Thumbnails for the report: downscaled JPEGs embedded as ``data:`` URIs, so that the page
opens from disk alone and stays small with thousands of slides (about 15-25 kB a slide)."""

from __future__ import annotations

import base64
import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

THUMB_LONG_SIDE_PX = 320
JPEG_QUALITY = 80
BACKGROUND_RGB = (255, 255, 255)
MAX_THREADS = 8  # Pillow decodes and resizes without the GIL


@dataclass(frozen=True)
class EmbeddedImage:
    """An image ready for ``<img src=...>``, with its pixel size for the width/height attributes."""

    data_uri: str
    width_px: int
    height_px: int


def embed_thumbnail(
    path: Path, long_side_px: int = THUMB_LONG_SIDE_PX, quality: int = JPEG_QUALITY
) -> EmbeddedImage | None:
    """Read ``path``, downscale its long side to at most ``long_side_px`` and encode it as a
    base64 JPEG. Transparent pictures are laid on white. Returns ``None`` (and logs why)
    when the file is missing or cannot be decoded, so that one bad picture costs one cell."""
    path = Path(path)
    if not path.is_file():
        log.debug("thumbnail %s is missing", path)
        return None
    try:
        with Image.open(path) as img:
            img.draft("RGB", (long_side_px, long_side_px))  # JPEG sources decode at a reduced scale
            img.thumbnail((long_side_px, long_side_px), Image.Resampling.LANCZOS, reducing_gap=3.0)
            rgb = _flatten_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("thumbnail %s cannot be read (%s); the report shows a placeholder", path, exc)
        return None
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality, optimize=True)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return EmbeddedImage(f"data:image/jpeg;base64,{data}", rgb.width, rgb.height)


def embed_thumbnails(paths: Sequence[Path | None]) -> list[EmbeddedImage | None]:
    """:func:`embed_thumbnail` of every path on a few threads, in order; ``None`` for ``None``."""
    n_threads = max(1, min(MAX_THREADS, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="report-thumb") as pool:
        return list(pool.map(lambda path: None if path is None else embed_thumbnail(path), paths))


def _flatten_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL mode; alpha (also palette transparency) composited over white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND_RGB)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")
