"""Quality-control pictures: the thumbnail with the tissue outline and the kept tile grid.

The tile grid stays legible with thousands of tiles: kept tiles get a translucent blue fill
and thin outlines (outlines are dropped when tiles are smaller than a few pixels, where
they would only paint the picture solid), and the tissue outline is drawn last, opaque.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from scipy import ndimage as ndi

from gsd_wsi.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

OUTLINE_RGB = (0, 255, 0)  # tissue outline: bright green, opaque
TILE_RGB = (0, 90, 255)  # kept tiles: blue
TILE_FILL_ALPHA = 0.18
TILE_LINE_ALPHA = 0.65
MIN_TILE_PX_FOR_LINES = 4.0


def render_tissue_qc(
    thumb_rgb: np.ndarray, tissue_mask: np.ndarray, tiles_thumb_xywh: np.ndarray, max_px: int = 2048
) -> np.ndarray:
    """Return an HxWx3 uint8 picture: thumbnail, kept tiles (blue) and tissue outline (green).

    ``tiles_thumb_xywh``: (N, 4) float (x, y, w, h) in thumbnail pixels. The picture is
    downscaled so that its longer side is at most ``max_px``.
    """
    rgb = np.asarray(thumb_rgb)
    if rgb.ndim == 3 and rgb.shape[2] == 4:
        rgb = rgb[..., :3]
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"thumbnail must be HxWx3, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    mask = np.asarray(tissue_mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"tissue mask shape {mask.shape} differs from thumbnail {rgb.shape[:2]}")
    tiles = np.asarray(tiles_thumb_xywh, dtype=np.float64).reshape(-1, 4)
    if max_px < 16:
        raise ValueError(f"max_px={max_px!r} is too small: expected at least 16")

    height, width = mask.shape
    scale = min(1.0, max_px / max(height, width, 1))
    if scale < 1.0:
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        rgb = np.asarray(Image.fromarray(rgb).resize((out_w, out_h), Image.Resampling.BOX))
        mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
        mask = np.asarray(mask_img.resize((out_w, out_h), Image.Resampling.BOX)) >= 128
        scale_x, scale_y = out_w / width, out_h / height
    else:
        scale_x = scale_y = 1.0
    out = rgb.astype(np.float32)

    n_tiles = len(tiles)
    if n_tiles:
        boxes = tiles * np.array([scale_x, scale_y, scale_x, scale_y])
        _draw_tiles(out, boxes)
    outline = mask & ~ndi.binary_erosion(mask, border_value=1)
    if max(out.shape[:2]) >= 1024:  # 2 px outline on large pictures
        outline = ndi.binary_dilation(outline) & mask
    out[outline] = OUTLINE_RGB
    picture = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    _legend(picture, [f"{n_tiles} tiles kept | tissue {100.0 * mask.mean():.1f}% of thumbnail",
                      f"{n_tiles} tiles"])
    log.debug("QC picture %s with %d tiles", picture.shape, n_tiles)
    return picture


def _draw_tiles(out: np.ndarray, boxes: np.ndarray) -> None:
    """Blend a translucent fill over the union of tiles, then thin outlines per tile."""
    height, width = out.shape[:2]
    x0 = np.clip(np.floor(boxes[:, 0]).astype(np.int64), 0, width)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(np.int64), 0, height)
    x1 = np.clip(np.ceil(boxes[:, 0] + boxes[:, 2]).astype(np.int64), 0, width)
    y1 = np.clip(np.ceil(boxes[:, 1] + boxes[:, 3]).astype(np.int64), 0, height)
    visible = (x1 > x0) & (y1 > y0)
    covered = np.zeros((height, width), dtype=bool)
    for a, b, c, d in zip(y0[visible], y1[visible], x0[visible], x1[visible]):
        covered[a:b, c:d] = True
    colour = np.asarray(TILE_RGB, dtype=np.float32)
    out[covered] = (1 - TILE_FILL_ALPHA) * out[covered] + TILE_FILL_ALPHA * colour

    if np.median(np.minimum(boxes[:, 2], boxes[:, 3])) < MIN_TILE_PX_FOR_LINES:
        return  # lines would merge into a solid colour; the fill alone shows the kept area
    lines = np.zeros((height, width), dtype=bool)
    for a, b, c, d in zip(y0[visible], y1[visible], x0[visible], x1[visible]):
        lines[a, c:d] = True
        lines[b - 1, c:d] = True
        lines[a:b, c] = True
        lines[a:b, d - 1] = True
    out[lines] = (1 - TILE_LINE_ALPHA) * out[lines] + TILE_LINE_ALPHA * colour


def _legend(picture: np.ndarray, texts: list[str]) -> None:
    """Write the first of ``texts`` that fits in the top-left corner, on a white box."""
    if min(picture.shape[:2]) < 32:
        return
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, picture.shape[1] // 80))  # legible at any picture size
    for text in texts:
        _, _, right, bottom = draw.textbbox((4, 3), text, font=font)
        if right + 4 <= picture.shape[1]:  # else too narrow: try a shorter one, never clip
            draw.rectangle((0, 0, right + 4, bottom + 3), fill=(255, 255, 255))
            draw.text((4, 3), text, fill=(0, 0, 0), font=font)
            picture[...] = np.asarray(image)
            return


def save_png(path: Path, rgb: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Encode ``rgb`` (HxWx3 or HxW uint8) as PNG in memory and write it atomically.

    ``text`` goes into the PNG's text chunks (e.g. the software version and settings that
    made the picture), readable with ``PIL.Image.open(path).text``.
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"save_png expects HxW or HxWx3/4 uint8, got {arr.dtype} {arr.shape}")
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    Image.fromarray(arr).save(buffer, format="PNG", compress_level=1, pnginfo=info)  # fast: a QC picture
    atomic_write_bytes(Path(path), buffer.getvalue())
    log.debug("wrote %s (%d bytes)", path, buffer.tell())
