"""Shared handling of settings: dataclasses from dicts and YAML, with unknown keys refused.

A misspelt setting is an error that lists the known ones, never a silently ignored key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gsd_wsi.errors import ConfigError

T = TypeVar("T")


def check_keys(where: str, given: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")


def dataclass_from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """``cls(**data)`` after checking that every key is one of its fields."""
    check_keys(where, data, {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    return cls(**data)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ``what`` names it in errors (e.g. "--config x.yaml")."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: no such file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a YAML mapping of settings")
    return data
