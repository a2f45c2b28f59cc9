"""The QC picture of a segmentation: the slide thumbnail with the class mask over it.

Labels (any level of the mask pyramid) are resized to the thumbnail with nearest
neighbours, each foreground class is blended in its colour (background stays untouched),
region borders are drawn opaque and one pixel thin, and a legend box lists the classes
with their colour swatches and their share of the mask. Save it with
:func:`gsd_wsi.qc.save_png`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gsd_wsi.masks.palette import check_class_names, check_colors

log = logging.getLogger(__name__)

MIN_LEGEND_PX = 48  # pictures smaller than this get no legend


def render_overlay(
    thumbnail_rgb: np.ndarray, labels: np.ndarray, class_names: Sequence[str], colors: Sequence[Sequence[int]],
    alpha: float = 0.45, outline: bool = True, instances: np.ndarray | None = None,
) -> np.ndarray:
    """Return an HxWx3 uint8 picture of the thumbnail (HxWx3 or HxWx4 uint8) with ``labels``
    (uint8 class indices, any size: resized nearest to the thumbnail) coloured over it.

    With ``instances`` (object ids of the same size as ``labels``) the outlines are drawn
    around every object, so touching nuclei are seen apart."""
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim == 3 and rgb.shape[2] == 4:
        rgb = rgb[..., :3]
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"thumbnail must be HxWx3 uint8, got {rgb.dtype} {rgb.shape}")
    labels = np.asarray(labels)
    if labels.dtype != np.uint8 or labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 2-D uint8 array, got {labels.dtype} {labels.shape}")
    names = check_class_names(class_names)
    colours = check_colors(colors, len(names))
    if int(labels.max()) >= len(names):
        raise ValueError(f"labels hold class {int(labels.max())} but only {len(names)} classes are named")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1]")

    height, width = rgb.shape[:2]
    if labels.shape != (height, width):
        labels = np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))
    lut = np.zeros((256, 3), dtype=np.float32)
    lut[: len(colours)] = colours
    foreground = labels > 0
    picture = np.array(rgb, dtype=np.uint8)  # blended in float only where there is a class
    blended = (1.0 - alpha) * picture[foreground] + alpha * lut[labels[foreground]]
    picture[foreground] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if outline:
        border = _borders(labels)
        if instances is not None:
            ids = np.asarray(instances).astype(np.int32)
            if ids.shape != (height, width):
                ids = np.asarray(Image.fromarray(ids).resize((width, height), Image.Resampling.NEAREST))
            border = _borders(ids) & foreground
        picture[border] = lut[labels[border]].astype(np.uint8)
    shares = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
    _legend(picture, [(names[i], colours[i], float(shares[i])) for i in range(1, len(names))])
    log.debug("overlay %s, %.1f%% foreground", picture.shape, 100.0 * foreground.mean())
    return picture


def _borders(labels: np.ndarray) -> np.ndarray:
    """Foreground pixels whose 4-neighbour (or the picture edge) has another label."""
    padded = np.pad(labels, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    differs = ((centre != padded[:-2, 1:-1]) | (centre != padded[2:, 1:-1])
               | (centre != padded[1:-1, :-2]) | (centre != padded[1:-1, 2:]))
    return differs & (labels > 0)


def _legend(picture: np.ndarray, entries: list[tuple[str, tuple[int, int, int], float]]) -> None:
    """Draw a white box in the top-left corner: one swatch and "name (share%)" per class."""
    if min(picture.shape[:2]) < MIN_LEGEND_PX or not entries:
        return
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    size = max(12, picture.shape[1] // 50)  # legible at any picture size
    font = ImageFont.load_default(size=size)
    pad, line = 4, size + 4
    texts = [f"{name} ({100.0 * share:.1f}%)" for name, _, share in entries]
    text_w = max(draw.textbbox((0, 0), text, font=font)[2] for text in texts)
    box_w, box_h = pad + size + pad + text_w + pad, pad + line * len(entries) + pad
    if box_w > picture.shape[1] or box_h > picture.shape[0]:
        return  # never clip: a legend that does not fit is left out
    draw.rectangle((0, 0, box_w, box_h), fill=(255, 255, 255), outline=(0, 0, 0))
    for i, ((_, colour, _), text) in enumerate(zip(entries, texts, strict=True)):
        top = pad + i * line
        draw.rectangle((pad, top, pad + size, top + size), fill=colour, outline=(0, 0, 0))
        draw.text((pad + size + pad, top), text, fill=(0, 0, 0), font=font)
    picture[...] = np.asarray(image)
