"""Mask outputs of ``gsd-wsi segment``: one class mask, three files for three kinds of reader.

The mask is an image of uint8 class indices (0 = background, 1.. = the named classes) of
``height_px x width_px`` pixels at ``mpp`` microns per pixel. Frame: mask level-0 pixel
(x, y) covers slide level-0 pixels ``[x*d, (x+1)*d) x [y*d, (y+1)*d)``, d being the slide
downsample (slide level-0 pixels per mask pixel).

- ``mask.ome.zarr`` (:mod:`.omezarr`): the reference output, an OME-NGFF 0.4 image-label
  pyramid in zarr format 2 (napari, ome-zarr-py, QuPath's OME-Zarr reader), written band by
  band by :class:`LabelPyramidWriter`, optionally with per-class probabilities. The other
  outputs are made from it.
- ``mask.tiff`` (:mod:`.tiff`): a tiled pyramidal palette TIFF that OpenSlide opens with
  all its levels, coloured by class in any viewer.
- ``mask.geojson`` (:mod:`.geojson`): one polygon per connected region, in slide level-0
  pixels minus the slide bounds, for QuPath import, with the area in um^2; for an instance
  model one QuPath detection per object instead (:class:`DetectionWriter`).
- ``instances.ome.zarr`` (:class:`InstancePyramidWriter`): an instance model's uint32 ids.

:func:`render_overlay` makes the QC picture; :func:`class_colors` the default palette.
"""

from __future__ import annotations

from gsd_wsi.masks.geojson import DetectionWriter, qupath_problems, write_geojson
from gsd_wsi.masks.omezarr import (
    InstancePyramidWriter,
    LabelPyramidInfo,
    LabelPyramidWriter,
    label_levels,
    mean_downsample_2x2,
    mode_downsample_2x2,
    open_label_level,
    pyramid_shapes,
    read_pyramid_info,
)
from gsd_wsi.masks.overlay import render_overlay
from gsd_wsi.masks.palette import class_colors
from gsd_wsi.masks.tiff import write_pyramidal_tiff

__all__ = [
    "DetectionWriter",
    "InstancePyramidWriter",
    "LabelPyramidInfo",
    "LabelPyramidWriter",
    "class_colors",
    "label_levels",
    "mean_downsample_2x2",
    "mode_downsample_2x2",
    "open_label_level",
    "pyramid_shapes",
    "qupath_problems",
    "read_pyramid_info",
    "render_overlay",
    "write_geojson",
    "write_pyramidal_tiff",
]
