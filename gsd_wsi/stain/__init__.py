"""Stain normalisation fitted once per slide and applied as a fixed per-pixel colour map.

Peer libraries re-estimate the source stains on every tile, which gives colour seams
between tiles and fails on blank ones. Here the source is estimated once per slide from
tissue pixels sampled across it (:meth:`StainNormalizer.fit_source`); every tile is then
mapped with the same recorded parameters (:attr:`StainNormalizer.params`), via a 2**24
lookup table where there are enough pixels for it to pay (:func:`lut_pays_off`).

    norm = make_normalizer("macenko")            # built-in target, or target_rgb=image
    norm.fit_source(tiles_sampled_from_slide)   # (K, H, W, 3) uint8; background dropped
    out = norm.transform(batch)                 # (N, H, W, 3) uint8 -> same
    json.dumps(norm.params)                     # record; StainNormalizer.from_params(...)

Numpy only (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gsd_wsi.errors import ConfigError
from gsd_wsi.stain.base import StainNormalizer, as_pixels
from gsd_wsi.stain.lut import lut_pays_off
from gsd_wsi.stain.macenko import MacenkoNormalizer
from gsd_wsi.stain.reinhard import ReinhardNormalizer
from gsd_wsi.stain.vahadane import VahadaneNormalizer

__all__ = [
    "METHODS",
    "IdentityNormalizer",
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "StainNormalizer",
    "VahadaneNormalizer",
    "builtin_target",
    "lut_pays_off",
    "make_normalizer",
    "recorded_normaliser",
]


class IdentityNormalizer(StainNormalizer):
    """Method "none": no normalisation. fit / fit_source only check their input."""

    method: ClassVar[str] = "none"
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _builtin_target(cls) -> dict[str, Any]:
        return {}

    def _estimate(self, tissue: np.ndarray) -> dict[str, Any]:
        return {}

    def _prepare(self) -> None:
        pass

    def _map_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return np.array(pixels, dtype=np.uint8)

    def fit(self, target_rgb: np.ndarray) -> IdentityNormalizer:
        as_pixels(target_rgb)
        return self

    def fit_source(self, rgb: np.ndarray) -> IdentityNormalizer:
        as_pixels(rgb)
        return self

    @property
    def is_fitted(self) -> bool:
        return True

    def transform(self, rgb: np.ndarray, *, use_lut: bool = True) -> np.ndarray:
        """Return ``rgb`` itself (not a copy)."""
        as_pixels(rgb)
        return rgb

    @property
    def params(self) -> dict[str, Any]:
        return {"method": "none"}

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> StainNormalizer:
        return cls()


#: Valid method names of :func:`make_normalizer`.
METHODS: tuple[str, ...] = ("macenko", "reinhard", "vahadane", "none")


def _class_of(method: str) -> type[StainNormalizer]:
    key = method.lower() if isinstance(method, str) else method
    if key not in METHODS:
        raise ConfigError(f"unknown stain normalisation method {method!r}; valid: {list(METHODS)}")
    return StainNormalizer._registry[key]


def check_stain_options(method: str, target: Path | str | None) -> None:
    """Refuse an unknown method, a target image that does not exist, or a target without a method."""
    if method not in METHODS:
        raise ConfigError(f"--stain must be one of {', '.join(METHODS)} (got {method!r})")
    if target is not None and method == "none":
        raise ConfigError("--stain-target has no effect with --stain none; drop one of them")
    if target is not None and not Path(target).is_file():
        raise ConfigError(f"--stain-target {target}: no such image file")


def normalise_image(normaliser: StainNormalizer, rgb: np.ndarray) -> np.ndarray:
    """Normalise one whole (H, W, 3) image with source stains fitted on the image itself, as
    labelled images are (slides are fitted once from tiles across them). The float map is
    cheaper than building the 2**24 lookup table below 16 Mpx."""
    return normaliser.fit_source(rgb).transform(rgb, use_lut=lut_pays_off(rgb.size // 3))


def recorded_normaliser(record: dict[str, Any] | None) -> StainNormalizer | None:
    """The normaliser a model recorded (method, settings, target; no source, which is fitted
    on each image or slide it is applied to), or None for "none"."""
    if not record or record.get("method", "none") == "none":
        return None
    if "target" not in record:  # only the method recorded: its built-in target
        return make_normalizer(record["method"], **record.get("settings", {}))
    return StainNormalizer.from_params({**record, "source": None})


def make_normalizer(
    method: str, target_rgb: np.ndarray | None = None, **settings: Any
) -> StainNormalizer:
    """A normaliser for ``method``, its target fitted on ``target_rgb`` or built in."""
    norm = _class_of(method)(**settings)
    if target_rgb is not None:
        norm.fit(target_rgb)
    return norm


def builtin_target(method: str) -> dict[str, Any]:
    """The built-in target parameters of ``method`` (``{}`` for "none").

    Macenko and Vahadane: Macenko's reference stain matrix and 99th-percentile
    concentrations; Reinhard: the LAB statistics of that reference rendered over a grid of
    concentrations (see :mod:`gsd_wsi.stain.reinhard`).
    """
    return _class_of(method)._builtin_target()
