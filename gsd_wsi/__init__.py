"""gsd-wsi: whole-slide images to segmentation masks, with diffusion self-supervision."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
