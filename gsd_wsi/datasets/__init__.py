"""Labelled images for fine-tuning and evaluation: discovery, loading, splits by image.

Leaf package (numpy, scikit-image, tifffile, Pillow; no torch). Three on-disk formats are
recognised by :func:`discover`: ``images/`` + ``masks/`` (+ ``annotations/`` with Aperio
XML), MoNuSeg-style ``.tif`` beside same-stem ``.xml``, and GlaS-style ``name.bmp`` beside
``name_anno.bmp``. Splits are always by image, never by patch.
"""

from __future__ import annotations

from gsd_wsi.errors import GsdWsiError


class DatasetError(GsdWsiError, ValueError):
    """A labelled data set is missing, malformed or inconsistent (the message names the file)."""


# Imported after DatasetError, which the submodules import from here.
from gsd_wsi.datasets.labelled import (  # noqa: E402
    INSTANCE_SOURCES,
    LabelledImage,
    discover,
    label_subset,
    load_example,
    load_instance_example,
    read_split_file,
    recorded_mpp,
    resample_example,
    split_by_image,
    split_from_file,
)
from gsd_wsi.datasets.monuseg_xml import rasterise_instances, read_aperio_mpp, read_aperio_xml  # noqa: E402

__all__ = [
    "DatasetError",
    "INSTANCE_SOURCES",
    "LabelledImage",
    "discover",
    "label_subset",
    "load_example",
    "load_instance_example",
    "rasterise_instances",
    "read_aperio_mpp",
    "read_aperio_xml",
    "read_split_file",
    "recorded_mpp",
    "resample_example",
    "split_by_image",
    "split_from_file",
]
