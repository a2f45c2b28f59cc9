"""Evaluation metrics (docs/method.md section 4): semantic, nuclei-instance and GlaS gland scores.

Plain numpy/scipy/scikit-image code; no torch. MONAI serves only as an independent
cross-check in the tests.
"""

from gsd_wsi.metrics.glands import glas_object_dice, glas_object_f1, glas_object_hausdorff
from gsd_wsi.metrics.instances import aji, label_instances, object_f1, panoptic_quality
from gsd_wsi.metrics.semantic import MetricInputError, confusion, hd95, semantic_scores

__all__ = [
    "MetricInputError",
    "aji",
    "confusion",
    "glas_object_dice",
    "glas_object_f1",
    "glas_object_hausdorff",
    "hd95",
    "label_instances",
    "object_f1",
    "panoptic_quality",
    "semantic_scores",
]
