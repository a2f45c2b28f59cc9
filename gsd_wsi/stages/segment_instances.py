"""`gsd-wsi segment` with an instance model (``finetune --target contour|distance``): nuclei, not just a mask.

The stitched bands carry the network's probabilities and one more channel, the haematoxylin
optical density of the scan's own pixels (gsd_wsi/stain/deconvolution.py). They go to a
:class:`~gsd_wsi.instance_bands.BandInstanceLabeller`, which applies the model's tuned
post-processing in overlapping cores and hands back finished rows of instance ids and each
nucleus once. From those this module writes, into the slide's temporary folder:

    instances.ome.zarr   uint32 instance ids (OME-NGFF image-label pyramid)
    mask.ome.zarr        the class mask: background and the object (every instance's pixels)
    mask.geojson         one QuPath detection per nucleus: "Area um^2", "Hematoxylin OD mean"

and counts what summary.json reports: the number of nuclei, their mean area and OD, and those
larger than the labelling margin (cut, so reported).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gsd_wsi.instance_bands import BandInstanceLabeller, Instance
from gsd_wsi.instances import PostprocessConfig
from gsd_wsi.masks import DetectionWriter, InstancePyramidWriter, LabelPyramidWriter
from gsd_wsi.targets import pixel_probabilities

#: Context around every labelling core: above the largest nucleus (tumour nuclei reach ~25 um).
MARGIN_UM = 32.0
OD_KEY = "Hematoxylin OD mean"


class InstanceSink:
    """Receives stitched bands (probabilities + OD channel), writes instances, mask and detections."""

    def __init__(self, width_px: int, height_px: int, mpp: float, n_classes: int, postprocess: PostprocessConfig,
                 outside: Callable[[int, np.ndarray], np.ndarray], mask_writer: LabelPyramidWriter,
                 instance_writer: InstancePyramidWriter, detections: DetectionWriter, probabilities: bool,
                 chunk_px: int) -> None:
        self.n_classes, self.mpp, self.outside = n_classes, mpp, outside
        self.kind = postprocess.kind
        self.mask_writer, self.instance_writer, self.detections = mask_writer, instance_writer, detections
        self.probabilities = probabilities
        self.margin_px = min(chunk_px, max(1, math.ceil(MARGIN_UM / mpp)))
        self.labeller = BandInstanceLabeller(width_px, height_px, postprocess, mpp, self._rows, self._instance,
                                             n_channels=n_classes, n_extra=1, margin_px=self.margin_px,
                                             core_rows=chunk_px, core_cols=max(2048, chunk_px))
        self.counts = np.zeros(2, np.int64)
        self.area_px = 0
        self.od_sum = 0.0
        self.seconds = 0.0

    def __call__(self, y0: int, blended: np.ndarray, weight: np.ndarray) -> None:
        started = time.perf_counter()
        probabilities = blended[: self.n_classes].copy()
        outside = self.outside(y0, weight)
        probabilities[:, outside] = 0.0
        probabilities[0][outside] = 1.0
        self.labeller.add(y0, probabilities, blended[self.n_classes:])
        self.seconds += time.perf_counter() - started  # labelling and writing, as the class sink's

    def finish(self) -> None:
        self.labeller.finish()

    def _rows(self, y0: int, ids: np.ndarray, probabilities_u8: np.ndarray) -> None:
        labels = (ids > 0).astype(np.uint8)
        self.counts += np.bincount(labels.ravel(), minlength=2)[:2]
        probs = None
        if self.probabilities:
            objects = pixel_probabilities(probabilities_u8.astype(np.uint16), self.kind)
            probs = np.minimum(objects, 255).astype(np.uint8)
        self.mask_writer.write_band(y0, labels, probs)
        self.instance_writer.write_band(y0, ids)

    def _instance(self, nucleus: Instance) -> None:
        od = nucleus.extra_means[0]
        self.area_px += nucleus.area_px
        self.od_sum += od * nucleus.area_px
        self.detections.add(nucleus.mask, nucleus.y0, nucleus.x0, {OD_KEY: round(od, 4)})

    def summary(self, tissue_mm2: float) -> dict[str, Any]:
        """summary.json ``"nuclei"``."""
        n = self.labeller.n_instances
        um2 = self.area_px * self.mpp**2
        return {"count": n, "per_mm2_tissue": n / tissue_mm2 if tissue_mm2 > 0 else None,
                "mean_area_um2": um2 / n if n else None,
                "mean_hematoxylin_od": self.od_sum / self.area_px if self.area_px else None,
                "larger_than_margin": self.labeller.n_truncated, "seen_twice_dropped": self.labeller.n_duplicates,
                "margin_um": self.margin_px * self.mpp, "postprocess": self.labeller.config.to_dict()}
