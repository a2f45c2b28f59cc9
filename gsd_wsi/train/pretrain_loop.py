"""The diffusion pretraining loop (docs/method.md section 1), one process of a DDP group.

Each step: draw t uniformly and eps ~ N(0, I), noise the batch, predict eps, and minimise
the P2-weighted squared error. Rank 0 logs, evaluates, draws monitoring grids and writes
checkpoints; every rank keeps its own seeded noise generator, saved with the checkpoint
so that a resumed run continues exactly (same step, optimizer state, data order, noise).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from gsd_wsi.errors import TrainingDivergedError
from gsd_wsi.nn.schedule import NoiseSchedule
from gsd_wsi.nn.unet import UNet
from gsd_wsi.train.pretrain_config import PretrainConfig
from gsd_wsi.train import checkpoint as ckpt
from gsd_wsi.train.data import EpochSampler, PatchDataset, PatchIndex, make_loader
from gsd_wsi.train.ddp import DistContext, all_reduce_mean, barrier, gather_objects
from gsd_wsi.train.monitor import plot_loss_curve, save_grid

logger = logging.getLogger(__name__)

_DENOISE_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # of T: the noise levels of the denoising grid


class TrainProgress(Protocol):
    def start(self, total_steps: int, first_step: int) -> None: ...
    def update(self, step: int, loss: float, img_per_s: float) -> None: ...
    def finish(self) -> None: ...


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def model(self) -> Path:
        """The final pretrained network (EMA weights) that `gsd-wsi finetune` loads."""
        return self.root / "model"


def p2_loss(eps: torch.Tensor, eps_hat: torch.Tensor, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """P2-weighted squared error: mean over pixels and channels, then mean (or sum) over the batch."""
    per_sample = F.mse_loss(eps_hat.float(), eps.float(), reduction="none").mean(dim=(1, 2, 3)) * weight
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def ema_with_warmup(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates,
    so the average follows the model early instead of staying near the random initialisation."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], model_params: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = float(n_averaged)
        effective = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, model_params, 1.0 - effective)

    return update


class DiffusionTrainer:
    """The model, its DDP wrapper, EMA, optimizer and noise generator, and one training step."""

    def __init__(self, ctx: DistContext, config: PretrainConfig, model: UNet, schedule: NoiseSchedule) -> None:
        self.ctx, self.config, self.schedule = ctx, config, schedule
        on_gpu = ctx.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if (config.precision == "bf16" or (config.precision == "auto" and on_gpu)) else None
        self.memory_format = torch.channels_last if (config.channels_last or (config.channels_last is None and on_gpu)) else torch.contiguous_format
        self.model = model.to(ctx.device, memory_format=self.memory_format)
        self.ddp = DistributedDataParallel(self.model) if ctx.distributed else self.model
        self.forward = torch.compile(self.ddp) if config.compile else self.ddp
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_with_warmup(config.ema_decay), use_buffers=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))
        warmup = config.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.noise = torch.Generator(device=ctx.device).manual_seed(config.seed * 1009 + ctx.rank)
        self.step = 0
        self.divergence_hint: Callable[[], str] = lambda: "resume from an earlier checkpoint"

    def _loss(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = self.schedule.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.schedule.add_noise(x0, eps, t).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            eps_hat = model(x_t, t)
        weight = self.schedule.p2_weight(t, k=self.config.p2_k, gamma=self.config.p2_gamma).to(x0.device)
        return p2_loss(eps, eps_hat, weight, self.config.loss_reduction)

    def train_step(self, x0: torch.Tensor) -> torch.Tensor:
        self.model.train()
        loss = self._loss(self.forward, x0, self.noise)
        if not torch.isfinite(all_reduce_mean(loss.detach(), self.ctx)):
            raise TrainingDivergedError(
                f"the loss became {loss.item()} at step {self.step + 1}; {self.divergence_hint()}. Lower --lr, "
                f"set --grad-clip, or resume with --resume")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update_parameters(self.model)
        return loss.detach()


class PretrainLoop(DiffusionTrainer):
    """The trainer plus its data, validation, pictures, checkpoints and run folder."""

    def __init__(self, ctx: DistContext, config: PretrainConfig, model: UNet, schedule: NoiseSchedule,
                 index: PatchIndex, paths: RunPaths, model_json: dict[str, Any]) -> None:
        super().__init__(ctx, config, model, schedule)
        self.paths, self.model_json = paths, model_json
        self.divergence_hint = self._last_checkpoint
        self.index = index
        self.train_set = PatchDataset(index.train, index.stores, config.image_size, index.tile_px)
        self.sampler = EpochSampler(len(self.train_set), config.batch_size, config.seed, ctx.rank, ctx.world_size)
        self.loader = make_loader(self.train_set, self.sampler, config.num_workers, pin_memory=ctx.device.type == "cuda")
        self.val_set = PatchDataset(index.val, index.stores, config.image_size, index.tile_px) if len(index.val) else None
        self.epoch, self.batch_in_epoch = 0, 0
        self.best_val = math.inf
        self.total_steps = config.steps or config.epochs * self.sampler.batches_per_epoch()

    def _last_checkpoint(self) -> str:
        last = ckpt.list_checkpoints(self.paths.checkpoints)
        return f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"

    # -- state --------------------------------------------------------------------------
    def _train_state(self, generator_states: list[torch.Tensor]) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "best_val": self.best_val,
            "world_size": self.ctx.world_size, "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(), "noise_generators": generator_states,
            "ema_n_averaged": self.ema.n_averaged.detach().cpu(),
        }

    def resume_from(self, folder: Path) -> None:
        state = ckpt.load_train_state(folder)
        self.model.load_state_dict(ckpt.load_weights(folder, ema=False))
        self.ema.module.load_state_dict(ckpt.load_weights(folder, ema=True))
        self.ema.n_averaged.copy_(state["ema_n_averaged"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        generators = state["noise_generators"]
        if len(generators) == self.ctx.world_size:
            self.noise.set_state(generators[self.ctx.rank].to(self.noise.get_state().device))
        else:
            logger.warning("resuming with %d processes instead of %d: data order and noise differ from an "
                           "uninterrupted run", self.ctx.world_size, len(generators))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_val = state["best_val"]
        logger.info("resumed from %s at step %d (epoch %d)", folder.name, self.step, self.epoch)

    def save(self, val_loss: float | None) -> None:
        """Checkpoint on rank 0 (every rank contributes its noise generator state); the best
        by validation loss is kept as a separate copy that pruning never removes."""
        states = gather_objects(self.noise.get_state().cpu(), self.ctx)
        if self.ctx.is_main:
            is_best = val_loss is not None and val_loss < self.best_val
            if is_best:
                self.best_val = val_loss
            weights, ema_weights = self.model.state_dict(), self.ema.module.state_dict()
            ckpt.save_checkpoint(self.paths.checkpoints / ckpt.step_dir_name(self.step), weights, ema_weights,
                                 self.model_json | {"step": self.step}, self._train_state(states))
            if is_best:
                ckpt.save_checkpoint(self.paths.checkpoints / "best", weights, ema_weights,
                                     self.model_json | {"step": self.step, "val_loss": val_loss}, None)
            ckpt.prune_checkpoints(self.paths.checkpoints, self.config.keep_last)
        barrier(self.ctx)

    # -- evaluation and pictures ------------------------------------------------------------
    def _val_batches(self, n_max: int) -> torch.Tensor | None:
        if self.val_set is None:
            return None
        n = min(len(self.val_set), n_max)
        positions = torch.linspace(0, len(self.val_set) - 1, n).round().long().unique()
        return torch.stack([self.val_set[(int(i), 0)] for i in positions])

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss of the EMA model on a fixed subset of the validation slides, with fixed noise."""
        x_all = self._val_batches(self.config.val_patches)
        if x_all is None:
            return None
        self.ema.module.eval()
        generator = torch.Generator(device=self.ctx.device).manual_seed(12345)
        losses = [self._loss(self.ema.module, batch.to(self.ctx.device), generator)
                  for batch in x_all.split(self.config.batch_size)]
        return float(torch.stack(losses).mean())

    @torch.no_grad()
    def draw_pictures(self) -> None:
        """DDPM samples from the EMA model, and the denoising of a fixed validation batch."""
        model = self.ema.module.eval()
        size = self.config.image_size
        generator = torch.Generator(device=self.ctx.device).manual_seed(777)
        samples = self.schedule.sample(lambda x, t: model(x, t).float(), (self.config.n_samples, 3, size, size),
                                       generator=generator, device=self.ctx.device, num_steps=self.config.sample_steps)
        text = {"step": str(self.step)}
        save_grid(self.paths.samples / f"samples-{self.step:08d}.png", samples, n_cols=min(8, self.config.n_samples), text=text)
        x0 = self._val_batches(n_max=4)
        if x0 is None:
            x0 = torch.stack([self.train_set[(i, 0)] for i in range(min(4, len(self.train_set)))])
        x0 = x0.to(self.ctx.device)
        rows = []
        for image in x0:
            row = [image]
            for fraction in _DENOISE_FRACTIONS:
                t = torch.full((1,), int(fraction * (self.schedule.config.timesteps - 1)), device=self.ctx.device)
                eps = torch.randn((1, *image.shape), generator=generator, device=self.ctx.device)
                x_t = self.schedule.add_noise(image[None], eps, t)
                eps_hat = model(x_t, t).float()
                abar = self.schedule.alphas_cumprod.to(self.ctx.device)[t].view(1, 1, 1, 1)
                x0_hat = ((x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()).clamp(-1, 1)
                row += [x_t[0], x0_hat[0]]
            rows.append(torch.stack(row))
        save_grid(self.paths.samples / f"denoise-{self.step:08d}.png", torch.cat(rows),
                  n_cols=1 + 2 * len(_DENOISE_FRACTIONS), text=text | {"columns": "clean, then (noisy, denoised) at t/T = "
                                                                       + ", ".join(map(str, _DENOISE_FRACTIONS))})

    # -- the loop -----------------------------------------------------------------------------
    def _log(self, row: dict[str, Any]) -> None:
        with self.paths.metrics.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def run(self, progress: TrainProgress | None) -> None:
        main = self.ctx.is_main
        if main and progress is not None:
            progress.start(self.total_steps, self.step)
        seen, window_steps, window_loss = 0, 0, torch.zeros((), device=self.ctx.device)
        window_start = time.perf_counter()
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip_batches(self.batch_in_epoch)
            for x0 in self.loader:
                loss = self.train_step(x0.to(self.ctx.device, non_blocking=True))
                self.step += 1
                self.batch_in_epoch += 1
                seen += x0.shape[0] * self.ctx.world_size
                window_steps += 1
                window_loss += loss
                at_end = self.step >= self.total_steps
                if self.step % self.config.log_every == 0 or at_end:
                    mean_loss = float(all_reduce_mean(window_loss / window_steps, self.ctx))
                    img_per_s = seen / (time.perf_counter() - window_start)
                    if main:
                        self._log({"step": self.step, "epoch": self.epoch, "loss": mean_loss,
                                   "lr": self.lr_schedule.get_last_lr()[0], "img_per_s": round(img_per_s, 3)})
                        if progress is not None:
                            progress.update(self.step, mean_loss, img_per_s)
                    seen, window_steps, window_loss = 0, 0, torch.zeros((), device=self.ctx.device)
                    window_start = time.perf_counter()
                checkpoint_now = self.step % self.config.checkpoint_every == 0 or at_end
                val_loss = None
                if self.step % self.config.val_every == 0 or checkpoint_now:
                    val_loss = self.validate() if main else None
                    if main and val_loss is not None:
                        self._log({"step": self.step, "epoch": self.epoch, "val_loss": val_loss})
                if main and (self.step % self.config.sample_every == 0 or at_end):
                    self.draw_pictures()
                    plot_loss_curve(self.paths.metrics, self.paths.root / "loss.png", f"gsd-wsi pretrain ({self.config.model})")
                if checkpoint_now:
                    self.save(val_loss)
                if at_end:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
                continue
            break
        self.loader = None  # type: ignore[assignment]  # stop persistent DataLoader workers now, not at exit
        if main:
            ckpt.save_checkpoint(self.paths.model, self.ema.module.state_dict(), None,
                                 self.model_json | {"step": self.step, "weights": "ema"}, None)
            if progress is not None:
                progress.finish()
        barrier(self.ctx)
