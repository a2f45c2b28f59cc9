"""`gsd-wsi pretrain`: diffusion self-supervised pretraining of the U-Net on patch stores.

Owns the run folder::

    RUN/config.json        settings used, model and schedule configs, stores, validation slides
    RUN/metrics.jsonl      step, epoch, loss, val_loss, lr, img/s
    RUN/loss.png           the loss curve
    RUN/samples/           samples-<step>.png (DDPM samples), denoise-<step>.png
    RUN/checkpoints/       step-<step>/ (the last K) and best/
    RUN/model/             the final pretrained network (EMA weights) for `gsd-wsi finetune`

and refuses to mix runs: a folder holding a run is only continued with ``--resume`` (same
learning settings) or replaced with ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gsd_wsi import __version__
from gsd_wsi.errors import RunFolderError
from gsd_wsi.nn.schedule import NoiseSchedule, ScheduleConfig
from gsd_wsi.nn.unet import UNet, UNetConfig, unet_config
from gsd_wsi.train.pretrain_config import PretrainConfig
from gsd_wsi.train import checkpoint as ckpt
from gsd_wsi.train.data import PatchIndex, find_stores, index_patches
from gsd_wsi.train.ddp import broadcast_object, check_nproc, init_distributed, launch, resolve_device, teardown
from gsd_wsi.train.monitor import truncate_metrics
from gsd_wsi.train.pretrain_loop import PretrainLoop, RunPaths, TrainProgress

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
_RUN_CONTENT = ("config.json", "metrics.jsonl", "loss.png", "samples", "checkpoints", "model")


@dataclass(frozen=True)
class PretrainJob:
    """Everything each process needs (picklable, for spawned processes)."""

    config: PretrainConfig
    run_dir: Path
    index: PatchIndex
    resume_from: Path | None
    progress_factory: Callable[[], TrainProgress] | None = None
    log_setup: Callable[[], None] | None = None
    prepare: tuple[bool, bool] | None = None  # (resume, overwrite): rank 0 prepares the folder itself


def model_json(config: PretrainConfig) -> dict[str, Any]:
    """What rebuilds the network and its schedule: stored in every checkpoint."""
    unet = unet_config(config.model, use_top_skip=config.use_top_skip, init=config.init)
    schedule = ScheduleConfig(kind=config.schedule, timesteps=config.timesteps)
    return {"kind": "gsd-wsi pretrained U-Net", "preset": config.model, "model": unet.to_dict(),
            "schedule": schedule.to_dict(), "image_size": config.image_size, "input_range": [-1.0, 1.0],
            "pretrain": config.to_dict()}


def _check_run_folder(run_dir: Path, config: PretrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """Decide what to do with an existing run folder; returns the checkpoint to resume from."""
    saved_path = run_dir / CONFIG_NAME
    if not saved_path.exists():
        return None
    if overwrite:
        for name in _RUN_CONTENT:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        return None
    try:
        saved = PretrainConfig.from_dict(json.loads(saved_path.read_text())["pretrain"], where=str(saved_path))
    except (KeyError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{saved_path} is unreadable ({exc}); use --overwrite to start afresh") from exc
    before = saved.learning_settings()
    differences = {k: (before.get(k), v) for k, v in config.learning_settings().items() if before.get(k) != v}
    if not resume:
        what = "a run with different settings" if differences else "a run"
        raise RunFolderError(f"{run_dir} holds {what}; continue it with --resume or replace it with --overwrite")
    if differences:
        listed = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in differences.items())
        raise RunFolderError(f"--resume: the settings differ from the run's ({listed}); use the run's settings "
                             f"or --overwrite")
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not found:
        logger.warning("%s has no checkpoint yet; starting from step 0", run_dir)
        return None
    return found[-1][1]


def run_pretrain(stores: Sequence[str | Path], run_dir: str | Path, config: PretrainConfig, nproc: int = 1,
                 resume: bool = False, overwrite: bool = False,
                 progress_factory: Callable[[], TrainProgress] | None = None,
                 log_setup: Callable[[], None] | None = None) -> RunPaths:
    """Pretrain on ``stores`` (patches.zarr paths or folders of them) into ``run_dir``.

    Started by torchrun (WORLD_SIZE in the environment), this process is one rank of the
    group and rank 0 prepares the run folder once the group has formed; otherwise the
    folder is prepared here and ``nproc`` processes are started.
    """
    run_dir = Path(run_dir)
    index = index_patches(find_stores(stores), config.val_fraction, config.seed)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        train_process(PretrainJob(config, run_dir, index, None, progress_factory, log_setup, (resume, overwrite)))
        return RunPaths(run_dir)
    check_nproc(nproc, resolve_device(config.device))
    resume_from = prepare_run_folder(run_dir, config, index, resume, overwrite)
    launch(nproc, train_process, PretrainJob(config, run_dir, index, resume_from, progress_factory, log_setup))
    return RunPaths(run_dir)


def prepare_run_folder(run_dir: Path, config: PretrainConfig, index: PatchIndex, resume: bool,
                       overwrite: bool) -> Path | None:
    """Check the folder, write config.json; returns the checkpoint to resume from, if any."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = _check_run_folder(run_dir, config, resume, overwrite)
    if resume_from is not None:
        ckpt.load_model_json(resume_from)  # fail here, once, on a corrupt checkpoint
        ckpt.load_train_state(resume_from)
    ckpt.write_json(run_dir / CONFIG_NAME, model_json(config) | {
        "stores": [str(p) for p in index.stores], "val_slides": list(index.val_slides),
        "n_train_patches": len(index.train), "n_val_patches": len(index.val), "gsd_wsi_version": __version__})
    return resume_from


def train_process(job: PretrainJob) -> None:
    """The body of every process: join the group, build, resume, train, leave."""
    if job.log_setup is not None:
        job.log_setup()
    ctx = init_distributed(job.config.device)
    if not ctx.is_main:
        logging.getLogger("gsd_wsi").setLevel(logging.WARNING)
    try:
        if job.prepare is not None:  # under torchrun: rank 0 prepares, the others learn the outcome
            resume_from = prepare_run_folder(job.run_dir, job.config, job.index, *job.prepare) if ctx.is_main else None
            job = dataclasses.replace(job, resume_from=broadcast_object(resume_from, ctx), prepare=None)
        torch.manual_seed(job.config.seed)  # identical initial weights on every rank
        info = model_json(job.config)
        model = UNet(UNetConfig.from_dict(info["model"]))
        schedule = NoiseSchedule(ScheduleConfig.from_dict(info["schedule"]))
        paths = RunPaths(job.run_dir)
        loop = PretrainLoop(ctx, job.config, model, schedule, job.index, paths, info)
        if job.resume_from is not None:
            loop.resume_from(job.resume_from)
            if ctx.is_main:
                truncate_metrics(paths.metrics, loop.step)
        if ctx.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            logger.info("pretraining %s U-Net (%.2f M parameters) on %d patches (%d held out) with %d process(es) "
                        "on %s, %d steps", job.config.model, n_params / 1e6, len(job.index.train), len(job.index.val),
                        ctx.world_size, ctx.device, loop.total_steps)
        progress = job.progress_factory() if (ctx.is_main and job.progress_factory is not None) else None
        loop.run(progress)
    finally:
        teardown()


