"""The stain-normaliser interface: fit once per slide, then apply a fixed colour map.

A normaliser holds two parameter sets: the *target* (the appearance to reach; a built-in
reference unless :meth:`StainNormalizer.fit` was called) and the *source* (the stains of
one slide, estimated once by :meth:`StainNormalizer.fit_source` from tissue pixels sampled
across the slide). With both fixed, normalisation is a per-pixel map uint8 RGB -> uint8
RGB, the same for every tile, so tiles of one slide never show colour seams and blank tiles
need no estimation.

Tissue pixels are those whose optical density OD = -log((I + 1) / Io) is at least ``beta``
in every channel (the background rule of Macenko's reference code). The fitted map is
tabulated once over all 2**24 colours (48 MiB, see :mod:`gsd_wsi.stain.lut`), and
:meth:`transform` is then a table lookup; ``use_lut=False`` runs the float code the table
was built from.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from gsd_wsi.errors import ConfigError, StainError
from gsd_wsi.stain.lut import apply_lut, build_lut

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

#: Version of the layout of :attr:`StainNormalizer.params`.
PARAMS_VERSION = 1
_FLOAT_CHUNK = 1 << 18  # pixels mapped at once on the float path (bounds temporaries)


def as_pixels(rgb: np.ndarray) -> np.ndarray:
    """View (N, 3) pixels, an (H, W, 3) image or a (K, H, W, 3) batch as (N, 3) uint8."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3, 4) or arr.shape[-1] != 3:
        raise StainError(
            f"expected uint8 RGB pixels of shape (N, 3), (H, W, 3) or (K, H, W, 3); got "
            f"dtype {arr.dtype} and shape {arr.shape}"
        )
    return arr.reshape(-1, 3)


def od_table(io: float) -> np.ndarray:
    """Optical density of each 8-bit intensity, OD(v) = -log((v + 1) / io), float64 (256,)."""
    return -np.log((np.arange(256, dtype=np.float64) + 1.0) / io)


def tissue_mask(pixels: np.ndarray, io: float, beta: float) -> np.ndarray:
    """Boolean (N,) mask of tissue: OD >= beta in all three channels."""
    dark = od_table(io) >= beta
    return dark[pixels[:, 0]] & dark[pixels[:, 1]] & dark[pixels[:, 2]]


def subsample(pixels: np.ndarray, max_n: int, seed: int) -> np.ndarray:
    """At most ``max_n`` rows of ``pixels``, drawn without replacement, reproducibly."""
    if len(pixels) <= max_n:
        return pixels
    rng = np.random.default_rng(seed)
    return pixels[np.sort(rng.choice(len(pixels), size=max_n, replace=False))]


def quantise(values: np.ndarray) -> np.ndarray:
    """Round float intensities to the nearest integer and clamp to uint8."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


class StainNormalizer(ABC):
    """Stain normaliser with a per-slide source fit and a fixed per-pixel map.

    Subclasses define :attr:`method`, the default settings, the estimator of their
    parameters from tissue pixels (:meth:`_estimate`), the built-in target, and the float
    map (:meth:`_map_pixels`) which must act on each pixel independently, elementwise (no
    BLAS reductions), so that it gives bit-identical results for any batch.
    """

    method: ClassVar[str]
    #: Settings and their defaults; every one is recorded in :attr:`params`.
    defaults: ClassVar[dict[str, Any]] = {
        "io": 240.0,  # transmitted light intensity Io of the OD conversion
        "beta": 0.15,  # OD threshold under which a pixel counts as background
        "min_tissue_pixels": 500,  # fewer tissue pixels than this -> StainError
        "max_fit_pixels": 1_000_000,  # larger samples are subsampled (seeded) before fitting
        "seed": 0,
    }
    _registry: ClassVar[dict[str, type[StainNormalizer]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            StainNormalizer._registry[cls.method] = cls

    def __init__(self, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ConfigError(
                f"unknown {self.method} setting(s) {unknown}; valid: {sorted(self.defaults)}"
            )
        self.settings: dict[str, Any] = {**self.defaults}
        for key, value in settings.items():
            self.settings[key] = _coerce_setting(self.method, key, value, self.defaults[key])
        self._target: dict[str, Any] = self._builtin_target()
        self._target_origin = "builtin"
        self._source: dict[str, Any] | None = None
        self._lut: np.ndarray | None = None

    # -- subclass hooks -----------------------------------------------------------------
    @classmethod
    @abstractmethod
    def _builtin_target(cls) -> dict[str, Any]:
        """Target parameters used when :meth:`fit` was never called."""

    @abstractmethod
    def _estimate(self, tissue: np.ndarray) -> dict[str, Any]:
        """Parameters (JSON-friendly lists) of the stains in (N, 3) uint8 tissue pixels."""

    @abstractmethod
    def _prepare(self) -> None:
        """Derive the constants of :meth:`_map_pixels` from the target and source."""

    @abstractmethod
    def _map_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """The float path: (P, 3) uint8 -> (P, 3) uint8 with the fitted parameters."""

    # -- fitting ------------------------------------------------------------------------
    def _tissue(self, rgb: np.ndarray, what: str) -> np.ndarray:
        pixels = as_pixels(rgb)
        tissue = pixels[tissue_mask(pixels, self.settings["io"], self.settings["beta"])]
        need = int(self.settings["min_tissue_pixels"])
        if len(tissue) < need:
            raise StainError(
                f"{self.method} {what}: too few tissue pixels ({len(tissue)} of "
                f"{len(pixels)} have optical density >= beta={self.settings['beta']} in "
                f"every channel; need {need}). Pass tiles sampled from the tissue of the "
                f"slide (e.g. those with a high tissue fraction) rather than background, "
                f"or lower beta / min_tissue_pixels."
            )
        return subsample(tissue, int(self.settings["max_fit_pixels"]), int(self.settings["seed"]))

    def fit(self, target_rgb: np.ndarray) -> Self:
        """Take the target appearance from the tissue pixels of an image (or pixels)."""
        self._target = self._estimate(self._tissue(target_rgb, "target"))
        self._target_origin = "image"
        logger.debug("%s target fitted: %s", self.method, self._target)
        self._refresh()
        return self

    def fit_source(self, rgb: np.ndarray) -> Self:
        """Estimate the source stains of ONE slide from its tissue pixels.

        ``rgb`` may be (N, 3) pixels or (H, W, 3) / (K, H, W, 3) tiles sampled across the
        slide; background pixels are dropped here, so whole tiles may be passed.
        """
        tissue = self._tissue(rgb, "fit_source")
        self._source = {**self._estimate(tissue), "n_pixels": int(len(tissue))}
        logger.debug("%s source fitted: %s", self.method, self._source)
        self._refresh()
        return self

    def _refresh(self) -> None:
        self._lut = None
        if self._source is not None:
            self._prepare()

    @property
    def is_fitted(self) -> bool:
        """True once the source stains are known (by :meth:`fit_source` or from params)."""
        return self._source is not None

    # -- applying -----------------------------------------------------------------------
    def transform(self, rgb: np.ndarray, *, use_lut: bool = True) -> np.ndarray:
        """Normalise (H, W, 3) or (N, H, W, 3) uint8 RGB with the fixed fitted parameters.

        ``use_lut=True`` looks each colour up in the 2**24 table (built on first use);
        ``use_lut=False`` evaluates the float map. Both give identical output.
        """
        arr = np.asarray(rgb)
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise StainError(
                f"transform expects uint8 RGB of shape (H, W, 3) or (N, H, W, 3); got "
                f"dtype {arr.dtype} and shape {arr.shape}"
            )
        if not self.is_fitted:
            raise StainError(
                f"the {self.method} normaliser has no source stains: call "
                f"fit_source(tiles or pixels of the slide) first, once per slide"
            )
        if use_lut:
            return apply_lut(self.lut(), arr)
        pixels = np.ascontiguousarray(arr).reshape(-1, 3)
        out = np.empty(arr.shape, dtype=np.uint8)
        out_px = out.reshape(-1, 3)
        for start in range(0, len(pixels), _FLOAT_CHUNK):
            out_px[start : start + _FLOAT_CHUNK] = self._map_pixels(
                pixels[start : start + _FLOAT_CHUNK]
            )
        return out

    def lut(self) -> np.ndarray:
        """The fitted map over all colours: (2**24,) of 3-byte RGB, index r + 256 g + 65536 b.

        Built once per fit with the float path itself, so a lookup equals :meth:`_map_pixels`
        exactly.
        """
        if self._lut is None:
            if not self.is_fitted:
                raise StainError(f"the {self.method} normaliser needs fit_source before lut()")
            t0 = time.perf_counter()
            self._lut = build_lut(self._map_pixels)
            logger.debug("%s lookup table built in %.2f s", self.method, time.perf_counter() - t0)
        return self._lut

    # -- parameters ---------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        """JSON-serialisable record of the method, settings, target and source parameters."""
        return {
            "method": self.method,
            "version": PARAMS_VERSION,
            "settings": dict(self.settings),
            "target_origin": self._target_origin,
            "target": _copy(self._target),
            "source": None if self._source is None else _copy(self._source),
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> StainNormalizer:
        """Rebuild a normaliser from :attr:`params`; its transform output is identical."""
        method = params.get("method") if isinstance(params, dict) else None
        klass = StainNormalizer._registry.get(method)  # type: ignore[arg-type]
        if klass is None:
            raise ConfigError(
                f"stain params name method {method!r}; valid: {sorted(StainNormalizer._registry)}"
            )
        if cls is not StainNormalizer and not issubclass(klass, cls):
            raise ConfigError(f"params are for {method!r}, not for {cls.method!r}")
        return klass._from_params(params)

    @classmethod
    def _from_params(cls, params: dict[str, Any]) -> StainNormalizer:
        if params.get("version") != PARAMS_VERSION:
            raise ConfigError(
                f"stain params version {params.get('version')!r} is not {PARAMS_VERSION}"
            )
        try:
            norm = cls(**params["settings"])
            norm._target = _copy(dict(params["target"]))
            norm._target_origin = params.get("target_origin", "image")
            source = params["source"]
            norm._source = None if source is None else _copy(dict(source))
            norm._refresh()
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, StainError | ConfigError):
                raise
            raise ConfigError(f"malformed {cls.method} stain params: {exc!r}") from exc
        return norm

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lut"] = None  # 48 MiB; rebuilt on first use (e.g. in a DataLoader worker)
        return state

    def __repr__(self) -> str:
        fitted = "fitted" if self.is_fitted else "unfitted"
        return f"{type(self).__name__}({fitted}, target={self._target_origin})"


#: Smallest valid value of the numeric settings (``alpha`` must also stay below 50).
_SETTING_MIN: dict[str, float] = {
    "io": 1.0, "beta": 0.0, "min_tissue_pixels": 1, "max_fit_pixels": 1,
    "alpha": 0.0, "lambda_": 0.0, "max_dl_pixels": 2, "n_iter": 1,
}  # fmt: skip


def _coerce_setting(method: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the plain Python type of ``default`` (JSON-safe), range-checked."""
    kind = type(default)
    try:
        number = float(value)
        if isinstance(value, bool) or not np.isfinite(number) or kind(number) != number:
            raise ValueError
    except (TypeError, ValueError):
        need = f"a finite {kind.__name__}"
        raise ConfigError(f"{method} setting {key}={value!r}: need {need}") from None
    low = _SETTING_MIN.get(key, -np.inf)
    if number < low or (key == "alpha" and number >= 50):
        raise ConfigError(f"{method} setting {key}={value!r} is out of range (>= {low})")
    return kind(number)


def _copy(value: Any) -> Any:
    """Deep copy of nested dicts / lists / numbers (params never alias internal state)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value
