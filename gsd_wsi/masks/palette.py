"""Default class colours of the mask outputs: background black, then distinct hues.

Class 1 is yellow: it stands out on H&E, whose tissue is pink and purple (a purple mask
over purple nuclei is invisible in an overlay). Classes 2-8 follow the rest of the
Okabe-Ito qualitative palette, which stays distinguishable with the common colour vision
deficiencies; further classes take hues spaced by the golden angle.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

from gsd_wsi.errors import ConfigError

RGB = tuple[int, int, int]

MAX_CLASSES = 256  # class indices are uint8
BACKGROUND_RGB: RGB = (0, 0, 0)
_FIRST_COLOURS: tuple[RGB, ...] = (
    (240, 228, 66),  # 1: Okabe-Ito yellow
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (230, 159, 0),  # orange
    (0, 114, 178),  # blue
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # reddish purple
)
_GOLDEN_TURN = 0.618033988749895


def class_colors(n_classes: int) -> list[RGB]:
    """``n_classes`` (r, g, b) colours, index 0 (background) black, all different."""
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ConfigError(f"n_classes={n_classes!r} must be in 1..{MAX_CLASSES} (labels are uint8)")
    colours: list[RGB] = [BACKGROUND_RGB, *_FIRST_COLOURS][:n_classes]
    hue = 0.11
    while len(colours) < n_classes:
        hue = (hue + _GOLDEN_TURN) % 1.0
        value = 0.95 if len(colours) % 2 else 0.75  # alternate brightness: neighbours in hue still differ
        r, g, b = colorsys.hsv_to_rgb(hue, 0.8, value)
        rgb = (round(r * 255), round(g * 255), round(b * 255))
        if rgb not in colours:
            colours.append(rgb)
    return colours


def check_colors(colors: Sequence[Sequence[int]], n_classes: int) -> list[RGB]:
    """Validate one (r, g, b) 0-255 colour per class; returns them as tuples of ints."""
    if len(colors) != n_classes:
        raise ConfigError(f"got {len(colors)} colours for {n_classes} classes: give one (r, g, b) per class")
    out: list[RGB] = []
    for i, colour in enumerate(colors):
        values = tuple(int(v) for v in colour)
        if len(values) != 3 or not all(0 <= v <= 255 for v in values):
            raise ConfigError(f"colour of class {i} is {tuple(colour)!r}: expected (r, g, b) ints in 0..255")
        out.append((values[0], values[1], values[2]))
    return out


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """Validate the class names: index 0 is background, 1..255 names, all different."""
    names = [str(n) for n in class_names]
    if not 1 <= len(names) <= MAX_CLASSES:
        raise ConfigError(f"{len(names)} class names given: expected 1..{MAX_CLASSES} (index 0 = background)")
    if len(set(names)) != len(names):
        raise ConfigError(f"class names must be different, got {names!r}")
    return names
