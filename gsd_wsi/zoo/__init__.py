"""The built-in models, shipped inside the package (no download): where they are, what they are,
and which one serves a slide of a given resolution.

Each model is a folder beside this module (``nuclei-40x/``), the same ``model.json`` +
``model.safetensors`` that `gsd-wsi finetune` writes, whose model.json carries a ``"builtin"``
record: its name, family, licence, training data and command, and validation scores.

A *family* (``nuclei``) names the models that do one job at several resolutions. Where a model
is asked for by its family, the slide's (or the images') resolution picks the member:
the finest model that is not finer than the slide, so the slide is brought down to the model
(never up) and loses as little detail as it can. A slide coarser than every member is refused with a message that says what would
work. ``--model nuclei-40x`` names one member and takes it whatever the slide.

Plain json and paths: no torch here, so `gsd-wsi models` and the option checks stay fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsd_wsi.errors import ConfigError
from gsd_wsi.grid import MAX_UPSAMPLE

ZOO_DIR = Path(__file__).resolve().parent
DEFAULT_FAMILY = "nuclei"


@dataclass(frozen=True)
class BuiltinModel:
    """One shipped model and its record (model.json ``"builtin"``)."""

    name: str
    family: str
    folder: Path
    mpp: float
    classes: tuple[str, ...]
    target: str
    licence: str
    record: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())

    @property
    def validation(self) -> dict[str, float]:
        """Validation scores recorded for it (Dice, AJI, PQ, ...)."""
        return dict(self.record.get("validation") or {})

    def serves(self, slide_mpp: float) -> bool:
        """Whether a slide at ``slide_mpp`` can be brought to this model without upsampling: the
        rule `segment` applies (gsd_wsi/grid.MAX_UPSAMPLE), so a member picked is never refused."""
        return slide_mpp <= self.mpp * MAX_UPSAMPLE


def builtin_models() -> list[BuiltinModel]:
    """Every shipped model, ordered by family, then finest first."""
    models = []
    for model_json in sorted(ZOO_DIR.glob("*/model.json")):
        info = json.loads(model_json.read_text())
        record = info.get("builtin")
        if not record:
            continue
        models.append(BuiltinModel(
            name=str(record["name"]), family=str(record["family"]), folder=model_json.parent, mpp=float(info["mpp"]),
            classes=tuple(str(c) for c in info["classes"]), target=str((info.get("target") or {}).get("kind", "semantic")),
            licence=str(record["licence"]), record=record))
    return sorted(models, key=lambda m: (m.family, m.mpp))


def builtin_names() -> list[str]:
    """Every name ``--model`` takes for a built-in: the families, then the single models."""
    models = builtin_models()
    return sorted({m.family for m in models}) + [m.name for m in models]


def builtin_name_of(spec: str | Path) -> str | None:
    """``spec`` as a built-in model or family name, or None for a path.

    A folder that exists wins over a built-in of the same name (``--model nuclei`` with a
    ``nuclei/`` run folder in the working directory takes the folder, as before built-ins
    existed). A bare word that is neither is refused, with the names that exist.
    """
    text = str(spec)
    if "/" in text or "\\" in text or Path(text).exists():
        return None
    if text in builtin_names():
        return text
    if text.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise unknown_name_error(text)
    return None


def unknown_name_error(spec: str | Path) -> ConfigError:
    return ConfigError(f"--model {spec}: no built-in model of that name and no such folder; built-in models: "
                       f"{', '.join(builtin_names()) or 'none installed'} (`gsd-wsi models` lists them), or give "
                       "the folder `gsd-wsi finetune -o` wrote")


def family_members(name: str) -> list[BuiltinModel]:
    """The models ``name`` stands for: a family's members, or the one model of that name."""
    models = builtin_models()
    members = [m for m in models if m.family == name] or [m for m in models if m.name == name]
    if not members:
        raise unknown_name_error(name)
    return members


def builtin_for_mpp(name: str, mpp: float | None) -> BuiltinModel:
    """The member of ``name`` for images at ``mpp`` um/px: the finest model not finer than them.

    A single model's name returns it whatever ``mpp``. Raises a one-line :class:`ConfigError`
    for a resolution coarser than every member (it says which resolutions would work), and for
    an unknown resolution when the family has several members.
    """
    members = family_members(name)
    if len(members) == 1 and members[0].name == name:
        return members[0]
    if mpp is None or not math.isfinite(mpp):
        if len(members) == 1:
            return members[0]
        raise ConfigError(f"--model {name}: the resolution is unknown, so no member can be picked "
                          f"({', '.join(f'{m.name} at {m.mpp:g} um/px' for m in members)}); give it (--slide-mpp, "
                          "--mpp) or name one")
    serving = [m for m in members if m.serves(mpp)]
    if not serving:
        coarsest = max(members, key=lambda m: m.mpp)
        raise ConfigError(f"--model {name}: the images are at {mpp:g} um/px, coarser than every built-in {name} model "
                          f"(the coarsest works at {coarsest.mpp:g} um/px); scan at {coarsest.mpp:g} um/px or finer, "
                          f"or fine-tune a model at {mpp:g} um/px (gsd-wsi finetune --train-mpp)")
    return min(serving, key=lambda m: m.mpp)


def builtin_or_path(spec: str | Path, mpp: float | None) -> Path:
    """The folder of the built-in model ``spec`` names (a family's member for ``mpp``), else
    ``spec`` as a path, unchecked (its loader says what is wrong with it)."""
    name = builtin_name_of(spec)
    return builtin_for_mpp(name, mpp).folder if name is not None else Path(spec)
