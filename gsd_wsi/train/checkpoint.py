"""Checkpoints: weights in safetensors, a JSON that rebuilds the model, resumable state.

Layout of one checkpoint folder (written under a temporary name, renamed when complete)::

    model.safetensors   the network's weights
    ema.safetensors     the exponential moving average of the weights (what sampling and
                        fine-tuning use)
    model.json          {"model": UNetConfig, "schedule": ScheduleConfig, "gsd_wsi_version", ...}:
                        enough to rebuild the network and its noise schedule
    state.pt            optimizer, learning-rate schedule, random generators, data position;
                        plain tensors and containers, loaded with torch.load(weights_only=True)

Nothing here unpickles arbitrary objects: safetensors holds only tensors, and state.pt is
read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gsd_wsi import __version__
from gsd_wsi.atomic import atomic_write_text, replace_dir, temporary_sibling
from gsd_wsi.errors import GsdWsiError

logger = logging.getLogger(__name__)

MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
MODEL_JSON = "model.json"
STATE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(GsdWsiError, OSError):
    """A checkpoint is missing, incomplete or corrupt."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def save_checkpoint(folder: Path, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor] | None,
                    model_json: dict[str, Any], train_state: dict[str, Any] | None) -> Path:
    """Write a complete checkpoint folder atomically; returns its path."""
    folder = Path(folder)
    tmp = temporary_sibling(folder)
    tmp.mkdir(parents=True)
    try:
        save_file(_contiguous(model_state), str(tmp / MODEL_WEIGHTS))
        if ema_state is not None:
            save_file(_contiguous(ema_state), str(tmp / EMA_WEIGHTS))
        (tmp / MODEL_JSON).write_text(json.dumps(model_json | {"gsd_wsi_version": __version__}, indent=2))
        if train_state is not None:
            torch.save(train_state, tmp / STATE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, folder)
    return folder


def load_model_json(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MODEL_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder}: no {MODEL_JSON}; not a gsd-wsi checkpoint") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt ({exc})") from exc


def load_weights(folder: Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """The EMA weights (or the raw ones with ``ema=False``; raw when there is no EMA file)."""
    folder = Path(folder)
    path = folder / EMA_WEIGHTS if ema and (folder / EMA_WEIGHTS).exists() else folder / MODEL_WEIGHTS
    try:
        return load_file(str(path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder}: no {path.name}; the checkpoint is incomplete") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt weights ({exc}); resume from an earlier checkpoint") from exc


def load_train_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder}: no {STATE}; this checkpoint cannot be resumed") from exc
    except Exception as exc:  # torch raises several types for a damaged file
        raise CheckpointError(f"{path}: corrupt training state ({type(exc).__name__}); "
                              f"delete {Path(folder).name} to resume from the one before") from exc


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first (temporary folders are never listed)."""
    if not Path(checkpoints_dir).is_dir():
        return []
    found = []
    for entry in Path(checkpoints_dir).iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (``best`` is a separate copy)."""
    for _, path in list_checkpoints(checkpoints_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))
