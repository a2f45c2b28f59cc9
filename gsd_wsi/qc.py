"""Quality-control pictures: the thumbnail with the tissue outline and the kept tile grid.

The tile grid stays legible with thousands of tiles: kept tiles get a translucent blue fill
and thin outlines (outlines are dropped when tiles are smaller than a few pixels, where
they would only paint the picture solid), and the tissue outline is drawn last, opaque.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image, ImageDraw, ImageFont
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
    picture = np.array(rgb, dtype=np.uint8)

    n_tiles = len(tiles)
    if n_tiles:
        boxes = tiles * np.array([scale_x, scale_y, scale_x, scale_y])
        _draw_tiles(picture, boxes)
    outline = mask & ~ndi.binary_erosion(mask, border_value=1)
    if max(picture.shape[:2]) >= 1024:  # 2 px outline on large pictures
        outline = ndi.binary_dilation(outline) & mask
    picture[outline] = OUTLINE_RGB
    _legend(picture, [f"{n_tiles} tiles kept | tissue {100.0 * mask.mean():.1f}% of thumbnail",
                      f"{n_tiles} tiles"])
    log.debug("QC picture %s with %d tiles", picture.shape, n_tiles)
    return picture


def _draw_tiles(picture: np.ndarray, boxes: np.ndarray) -> None:
    """Blend a translucent fill over the union of tiles, then thin outlines per tile (in place).

    A blended value depends only on the pixel's own value and on what covers it (nothing,
    the fill, the fill and a line), so each colour channel goes through a 3 x 256 table
    built with the blend itself: one lookup per pixel instead of float copies of the picture.
    """
    height, width = picture.shape[:2]
    x0 = np.clip(np.floor(boxes[:, 0]).astype(np.int64), 0, width)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(np.int64), 0, height)
    x1 = np.clip(np.ceil(boxes[:, 0] + boxes[:, 2]).astype(np.int64), 0, width)
    y1 = np.clip(np.ceil(boxes[:, 1] + boxes[:, 3]).astype(np.int64), 0, height)
    visible = (x1 > x0) & (y1 > y0)
    layer = np.zeros((height, width), dtype=np.uint8)  # 0 uncovered, 1 fill, 2 fill and a line
    for a, b, c, d in zip(y0[visible], y1[visible], x0[visible], x1[visible]):
        layer[a:b, c:d] = 1
    # lines would merge into a solid colour on tiny tiles; the fill alone shows the kept area
    if np.median(np.minimum(boxes[:, 2], boxes[:, 3])) >= MIN_TILE_PX_FOR_LINES:
        for a, b, c, d in zip(y0[visible], y1[visible], x0[visible], x1[visible]):
            layer[a, c:d] = 2  # lines lie inside their tile: on the fill
            layer[b - 1, c:d] = 2
            layer[a:b, c] = 2
            layer[a:b, d - 1] = 2
    colour = np.asarray(TILE_RGB, dtype=np.float32)
    values = np.broadcast_to(np.arange(256, dtype=np.float32)[:, None], (256, 3))
    filled = (1 - TILE_FILL_ALPHA) * values + TILE_FILL_ALPHA * colour
    lined = (1 - TILE_LINE_ALPHA) * filled + TILE_LINE_ALPHA * colour
    table = np.clip(np.rint(np.stack([values, filled, lined])), 0, 255).astype(np.uint8)  # (layer, value, channel)
    index = layer.astype(np.intp) * 256
    for ch in range(3):
        picture[..., ch] = table[:, :, ch].ravel().take(index + picture[..., ch])


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

    Fast, for QC pictures: zlib level 1 with the Paeth filter on every row (libpng through
    imagecodecs). Pillow tries all five filters on every row, which doubles the time for
    files 1 % smaller (0.13 against 0.06 s for 1600 x 1600 px).
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"save_png expects HxW or HxWx3/4 uint8, got {arr.dtype} {arr.shape}")
    png = imagecodecs.png_encode(np.ascontiguousarray(arr), level=1, filter=imagecodecs.PNG.FILTER.PAETH)
    if text:
        ihdr_end = 8 + 25  # the signature, then IHDR (length, type, 13 bytes, CRC): text may follow it
        png = png[:ihdr_end] + b"".join(_text_chunk(k, v) for k, v in text.items()) + png[ihdr_end:]
    atomic_write_bytes(Path(path), png)
    log.debug("wrote %s (%d bytes)", path, len(png))


def _text_chunk(key: str, value: str) -> bytes:
    """A tEXt chunk (Latin-1), or an uncompressed iTXt chunk (UTF-8) for other text, as Pillow writes."""
    try:
        kind, data = b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")
    except UnicodeEncodeError:
        kind, data = b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
