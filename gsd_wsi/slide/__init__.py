"""Reading whole-slide images: one `Slide` interface over several reader backends."""

from gsd_wsi.slide.base import MPP_SNAP_TOLERANCE, Slide, SlideLevel
from gsd_wsi.slide.open import BACKENDS, open_slide

__all__ = ["BACKENDS", "MPP_SNAP_TOLERANCE", "Slide", "SlideLevel", "open_slide"]
