"""Instances of a slide-sized probability map that arrives in row bands: every nucleus labelled
once and whole, whatever band or tile border it crosses.

The map is cut into cores of ``core_rows x core_cols`` px, labelled one at a time, left to
right and top to bottom, by :func:`gsd_wsi.instances.instances_from_probabilities` on the core
grown by ``margin_px`` on every side (its context). An instance belongs to the core holding its
*anchor*, its first pixel in raster order (top row, then leftmost); one whose anchor lies in
the margin is another core's. An instance smaller than the margin is seen whole, and the
same, from every core whose context holds it: the watershed floods each foreground component
from its own seeds in an order fixed by elevation and raster position, so its labels depend on
that component alone. The anchor test then picks exactly one owner. Pixels already claimed by
an earlier core's instance stay with it; a later instance that finds most of its pixels
claimed is that instance seen again (its context differed, e.g. a cluster wider than the
margin) and is dropped. So no instance is split at a border and none is counted twice, and
each is final, with its measurements, when its core is done. An instance larger than the
margin is cut where its owner's context ends and the rest is lost; ``n_truncated`` counts
them (choose the margin above the largest object: `segment` uses 32 um for nuclei).

    labeller = BandInstanceLabeller(width_px, height_px, config, mpp, on_rows, on_instance)
    for y0, probabilities, extra in bands:   # (C, rows, W) float in [0, 1]; (K, rows, W) float
        labeller.add(y0, probabilities, extra)
    labeller.finish()

``on_rows(y0, labels, probabilities_u8)`` receives finished rows in order: uint32 instance ids
(0 background; 1..n in the order instances were found) and the probabilities that made them
as uint8 (v / 255). ``on_instance(Instance)`` receives each instance once: its id, its pixels
(a bounding-box crop), its area and the mean of every ``extra`` channel over its pixels (e.g.
haematoxylin optical density). Memory: the probabilities (uint8) and extra channels (float16)
of ``core_rows + 2 * margin_px`` rows and the ids of ``core_rows + margin_px`` rows, all of
the map's width. Numpy, scipy and scikit-image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from gsd_wsi.errors import ConfigError
from gsd_wsi.instances import PostprocessConfig, instances_from_probabilities

log = logging.getLogger(__name__)

#: An instance finding at least this fraction of its pixels claimed is a duplicate.
DUPLICATE_FRACTION = 0.5


@dataclass(frozen=True)
class Instance:
    """One finished instance: ``mask`` is its pixels in the crop whose top-left is ``(y0, x0)``."""

    id: int
    y0: int
    x0: int
    mask: np.ndarray           # bool (h, w)
    area_px: int
    extra_means: tuple[float, ...]


RowsSink = Callable[[int, np.ndarray, np.ndarray], None]
InstanceSink = Callable[[Instance], None]


class BandInstanceLabeller:
    """See the module docstring."""

    def __init__(self, width_px: int, height_px: int, config: PostprocessConfig, mpp: float, on_rows: RowsSink,
                 on_instance: InstanceSink, n_channels: int, n_extra: int = 0, margin_px: int = 128,
                 core_rows: int = 512, core_cols: int = 2048) -> None:
        if width_px < 1 or height_px < 1:
            raise ConfigError(f"map must be at least 1x1 px (got {width_px}x{height_px})")
        if margin_px < 1 or core_rows < margin_px or core_cols < margin_px:
            raise ConfigError(f"cores ({core_rows}x{core_cols} px) must be at least the margin ({margin_px} px), "
                              f"which must be positive")
        self.width_px, self.height_px, self.config, self.mpp = int(width_px), int(height_px), config, float(mpp)
        self.on_rows, self.on_instance = on_rows, on_instance
        self.n_channels, self.n_extra = int(n_channels), int(n_extra)
        self.margin_px, self.core_rows, self.core_cols = int(margin_px), int(core_rows), int(core_cols)
        self._pieces: list[tuple[int, np.ndarray, np.ndarray]] = []  # (y0, probs u8, extra f16), in order
        self._received = 0          # rows given so far
        self._core_y0 = 0           # the band of cores to label next
        # ids of rows core_y0 .. core_y0 + core_rows + margin: the band's and what its instances reach below
        self._ids = np.zeros((self.core_rows + self.margin_px, self.width_px), np.uint32)
        self._next_id = 1
        self.n_instances = 0
        self.n_duplicates = 0
        self.n_truncated = 0        # instances reaching their context's edge: larger than the margin

    def add(self, y0: int, probabilities: np.ndarray, extra: np.ndarray | None = None) -> None:
        """Rows ``y0 .. y0 + rows`` of the map: probabilities (C, rows, W) in [0, 1], extra (K, rows, W)."""
        if y0 != self._received:
            raise ValueError(f"rows start at {y0} but row {self._received} is next: bands go in order, contiguous")
        probabilities = np.asarray(probabilities)
        rows = probabilities.shape[1]
        if probabilities.shape != (self.n_channels, rows, self.width_px) or y0 + rows > self.height_px:
            raise ValueError(f"probabilities of shape {probabilities.shape} at row {y0}; expected "
                             f"({self.n_channels}, rows, {self.width_px}) within {self.height_px} rows")
        if self.n_extra and (extra is None or extra.shape != (self.n_extra, rows, self.width_px)):
            raise ValueError(f"extra channels of shape {None if extra is None else extra.shape}; expected "
                             f"({self.n_extra}, {rows}, {self.width_px})")
        probs_u8 = np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)
        extra_f16 = (np.asarray(extra, np.float16) if self.n_extra
                     else np.zeros((0, rows, self.width_px), np.float16))
        self._pieces.append((y0, probs_u8, extra_f16))
        self._received = y0 + rows
        while self._core_y0 < self.height_px and self._received >= min(self._core_y1 + self.margin_px, self.height_px):
            self._label_band()

    def finish(self) -> None:
        if self._received != self.height_px:
            raise ValueError(f"rows {self._received}..{self.height_px} were never given")
        while self._core_y0 < self.height_px:
            self._label_band()
        log.info("%d instances (%d seen twice and dropped, %d larger than the %d-px margin)", self.n_instances,
                 self.n_duplicates, self.n_truncated, self.margin_px)

    @property
    def _core_y1(self) -> int:
        return min(self._core_y0 + self.core_rows, self.height_px)

    def _rows(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (u8) and extra channels of map rows ``y0 .. y1`` from the pieces held."""
        probs, extra = [], []
        for p0, p, e in self._pieces:
            a, b = max(y0, p0), min(y1, p0 + p.shape[1])
            if a < b:
                probs.append(p[:, a - p0: b - p0])
                extra.append(e[:, a - p0: b - p0])
        return np.concatenate(probs, axis=1), np.concatenate(extra, axis=1)

    def _label_band(self) -> None:
        cy0, cy1 = self._core_y0, self._core_y1
        ey0, ey1 = max(0, cy0 - self.margin_px), min(self.height_px, cy1 + self.margin_px)
        probs, extra = self._rows(ey0, ey1)
        for cx0 in range(0, self.width_px, self.core_cols):
            cx1 = min(cx0 + self.core_cols, self.width_px)
            ex0, ex1 = max(0, cx0 - self.margin_px), min(self.width_px, cx1 + self.margin_px)
            self._label_core((cy0, cy1, cx0, cx1), (ey0, ey1, ex0, ex1), probs[:, :, ex0:ex1], extra[:, :, ex0:ex1])
        rows = cy1 - cy0
        self.on_rows(cy0, self._ids[:rows].copy(), probs[:, cy0 - ey0: cy1 - ey0])
        # the rows below the band, claimed by its instances, move to the top
        self._ids[: self.margin_px] = self._ids[rows: rows + self.margin_px]
        self._ids[self.margin_px:] = 0
        self._core_y0 = cy1
        keep_from = max(0, cy1 - self.margin_px)
        self._pieces = [p for p in self._pieces if p[0] + p[1].shape[1] > keep_from]

    def _label_core(self, core: tuple[int, int, int, int], context: tuple[int, int, int, int], probs_u8: np.ndarray,
                    extra: np.ndarray) -> None:
        cy0, cy1, cx0, cx1 = core
        ey0, ey1, ex0, ex1 = context
        if not probs_u8[0].min() < 255:  # background everywhere (glass, outside tissue): nothing to find
            return
        labels = instances_from_probabilities(probs_u8.astype(np.float32) / 255.0, self.config, self.mpp)
        n = int(labels.max())
        if n == 0:
            return
        flat = labels.ravel()
        values, first = np.unique(flat, return_index=True)  # each label's first pixel in raster order
        first, values = first[values > 0], values[values > 0]
        ay, ax = first // labels.shape[1] + ey0, first % labels.shape[1] + ex0
        owned = np.zeros(n + 1, bool)
        owned[values[(ay >= cy0) & (ay < cy1) & (ax >= cx0) & (ax < cx1)]] = True
        if not owned.any():
            return
        # owned instances start at row >= cy0: only the context's rows from the core down matter
        sub = labels[cy0 - ey0:]
        ids = self._ids[: sub.shape[0], ex0:ex1]
        mine = owned[sub]
        claimed = mine & (ids > 0)
        total = np.bincount(sub[mine], minlength=n + 1)
        taken = np.bincount(sub[claimed], minlength=n + 1)
        duplicate = owned & (taken >= DUPLICATE_FRACTION * np.maximum(total, 1))
        self.n_duplicates += int(duplicate.sum())
        keep = owned & ~duplicate
        if not keep.any():
            return
        new_ids = np.zeros(n + 1, np.uint32)
        kept = np.flatnonzero(keep)
        new_ids[kept] = np.arange(self._next_id, self._next_id + len(kept), dtype=np.uint32)
        self._next_id += len(kept)
        write = keep[sub] & ~claimed
        ids[write] = new_ids[sub[write]]
        # the truncated: kept instances that reach the context's edge where the map goes on
        edges = [labels[-1] if ey1 < self.height_px else None, labels[:, 0] if ex0 > 0 else None,
                 labels[:, -1] if ex1 < self.width_px else None]
        at_edge = np.zeros(n + 1, bool)
        for edge in edges:
            if edge is not None:
                at_edge[edge] = True
        self.n_truncated += int((at_edge & keep).sum())
        self._emit(np.where(write, sub, 0), new_ids, kept, extra[:, cy0 - ey0:], cy0, ex0)

    def _emit(self, written: np.ndarray, new_ids: np.ndarray, kept: np.ndarray, extra: np.ndarray, y0: int,
              x0: int) -> None:
        """One :class:`Instance` per kept label of ``written`` (core-local labels, 0 elsewhere)."""
        n = len(new_ids) - 1
        area = np.bincount(written.ravel(), minlength=n + 1)
        sums = [np.bincount(written.ravel(), weights=channel.ravel().astype(np.float64), minlength=n + 1)
                for channel in extra]
        boxes = ndi.find_objects(written, max_label=n)
        for label in kept:  # a kept instance wrote at least half its pixels: its box exists
            box = boxes[label - 1]
            self.n_instances += 1
            mask = written[box] == label
            self.on_instance(Instance(int(new_ids[label]), y0 + box[0].start, x0 + box[1].start, mask,
                                      int(area[label]), tuple(float(s[label] / area[label]) for s in sums)))
