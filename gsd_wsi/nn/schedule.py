"""The DDPM noise schedule: betas, the forward process, the P2 loss weight and ancestral sampling.

docs/method.md section 1. A small object apart from the network: ``add_noise`` for training,
``p2_weight`` for the loss, ``step``/``sample`` for monitoring grids, and a config that
round-trips to JSON.

The maths is written here rather than delegated to MONAI's ``DDPMScheduler``, whose schedule
functions agree with ours (the tests check it) but whose object does not serve cleanly:
``add_noise`` casts its stored ``alphas_cumprod`` to the dtype of the batch *in place*, so one
bf16 batch degrades every later step to bf16 coefficients; its tensors are not buffers and do
not follow ``.to()``; and with a strided ``set_timesteps`` its ``step`` still takes
``alphas_cumprod[t - 1]`` as the previous step, which is wrong for any subsequence. Here the
tables are built in float64, per-step coefficients are Python floats from those tables, and a
strided sampler recomputes each step's beta from the two cumulative products it bridges.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from gsd_wsi.config import dataclass_from_dict
from gsd_wsi.errors import ConfigError

log = logging.getLogger(__name__)

ScheduleKind = Literal["quadratic", "linear", "cosine"]
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)
COSINE_S = 0.008          # Nichol & Dhariwal's offset
MAX_BETA = 0.999          # ... and their clip of the cosine betas


@dataclass(frozen=True)
class ScheduleConfig:
    """The beta schedule (docs/method.md section 1). ``beta_start``/``beta_end`` do not apply to cosine."""

    kind: ScheduleKind = "quadratic"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"schedule kind must be one of {', '.join(SCHEDULE_KINDS)} (got {self.kind!r})")
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int) or self.timesteps < 2:
            raise ConfigError(f"schedule timesteps must be an integer >= 2 (got {self.timesteps!r})")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(
                f"schedule betas need 0 < beta_start <= beta_end < 1 "
                f"(got beta_start={self.beta_start!r}, beta_end={self.beta_end!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleConfig:
        return dataclass_from_dict(cls, data, "schedule config")


def beta_schedule(config: ScheduleConfig) -> Tensor:
    """The betas of ``config`` as a float64 tensor of shape (T,)."""
    T = config.timesteps
    if config.kind == "quadratic":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2
    if config.kind == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
    # cosine (Nichol & Dhariwal 2021): abar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)


class NoiseSchedule:
    """DDPM forward process and ancestral sampler for an eps-predicting network.

    ``betas`` and ``alphas_cumprod`` are float32 CPU tensors of shape (T,), computed in float64.
    Methods taking a tensor ``t`` work on its device (a per-device copy of the tables is cached).
    """

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        betas64 = beta_schedule(self.config)
        self._abar64 = torch.cumprod(1 - betas64, dim=0)
        self.betas = betas64.to(torch.float32)
        self.alphas_cumprod = self._abar64.to(torch.float32)
        self._snr = (self._abar64 / (1 - self._abar64)).to(torch.float32)
        self._tables: dict[tuple[str, torch.device], Tensor] = {}

    @property
    def timesteps(self) -> int:
        return self.config.timesteps

    def _table(self, name: str, device: torch.device) -> Tensor:
        key = (name, device)
        if key not in self._tables:
            self._tables[key] = {"abar": self.alphas_cumprod, "snr": self._snr}[name].to(device)
        return self._tables[key]

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """``batch`` timesteps drawn uniformly from [0, T) (drawn on the generator's device)."""
        draw_device = generator.device if generator is not None else device
        t = torch.randint(0, self.timesteps, (batch,), generator=generator, device=draw_device)
        return t.to(device) if device is not None else t

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, on x0's device and dtype.

        The arithmetic runs in at least float32 even for a bf16 ``x0``; only the result is cast.
        """
        abar = self._table("abar", x0.device)[t.to(x0.device)]
        abar = abar.reshape(-1, *([1] * (x0.ndim - 1)))
        work = torch.promote_types(x0.dtype, torch.float32)
        x_t = abar.sqrt().to(work) * x0.to(work) + (1 - abar).sqrt().to(work) * noise.to(work)
        return x_t.to(x0.dtype)

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (float32, on t's device)."""
        t = torch.as_tensor(t)
        return self._table("snr", t.device)[t]

    def p2_weight(self, t: Tensor | int, k: float = 1.0, gamma: float = 1.0) -> Tensor:
        """P2 loss weight ``1 / (k + SNR_t) ** gamma`` (Choi et al. 2022): ``1 - abar_t`` for k = gamma = 1."""
        return (k + self.snr(t)) ** -gamma

    def step(
        self, model_output: Tensor, t: int, x_t: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """One ancestral DDPM step ``x_t -> x_{t-1}`` from the predicted noise ``model_output``.

        The predicted x0 is clipped to [-1, 1]; the posterior variance is the "fixed small" one,
        ``beta_t (1 - abar_{t-1}) / (1 - abar_t)``; at t = 0 the clipped x0 estimate is returned.
        """
        t = int(t)
        if not 0 <= t < self.timesteps:
            raise ConfigError(f"timestep must be in [0, {self.timesteps}) (got {t})")
        abar_prev = float(self._abar64[t - 1]) if t > 0 else 1.0
        return self._posterior_step(model_output, x_t, float(self._abar64[t]), abar_prev, generator)

    def _posterior_step(
        self, eps: Tensor, x_t: Tensor, abar_t: float, abar_prev: float, generator: torch.Generator | None
    ) -> Tensor:
        """Step from ``abar_t`` to ``abar_prev`` (any earlier timestep: beta is the bridging one)."""
        work = torch.promote_types(x_t.dtype, torch.float32)
        x, eps = x_t.to(work), eps.to(work)
        x0 = ((x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)).clamp(-1.0, 1.0)
        beta = 1 - abar_t / abar_prev
        mean = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0 + (
            math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)
        ) * x
        if abar_prev < 1.0:
            variance = max(beta * (1 - abar_prev) / (1 - abar_t), 1e-20)
            noise = torch.randn(x.shape, generator=generator, dtype=work,
                                device=generator.device if generator is not None else x.device)
            mean = mean + math.sqrt(variance) * noise.to(x.device)
        return mean.to(x_t.dtype)

    @torch.no_grad()
    def sample(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        progress: Callable[[int], None] | None = None,
        num_steps: int | None = None,
    ) -> Tensor:
        """Ancestral sampling from pure noise (for monitoring grids), on ``device``.

        ``num_steps`` < T samples along an evenly strided subsequence of timesteps (always
        ending at 0), each step using the beta that bridges its two cumulative products;
        ``None`` runs all T steps. ``progress`` is called after each step with the number of
        steps done. The model's train/eval mode is left to the caller.
        """
        seq = self.sampling_timesteps(num_steps)
        device = torch.device(device) if device is not None else (
            generator.device if generator is not None else torch.device("cpu"))
        draw_device = generator.device if generator is not None else device
        x = torch.randn(shape, generator=generator, device=draw_device).to(device)
        log.debug("DDPM sampling %s in %d of %d steps on %s", tuple(shape), len(seq), self.timesteps, device)
        for i, t in enumerate(seq):
            t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
            abar_prev = float(self._abar64[seq[i + 1]]) if i + 1 < len(seq) else 1.0
            x = self._posterior_step(model(x, t_batch), x, float(self._abar64[t]), abar_prev, generator)
            if progress is not None:
                progress(i + 1)
        return x

    def sampling_timesteps(self, num_steps: int | None = None) -> list[int]:
        """Descending timesteps a sampler visits: all T, or ``num_steps`` evenly spread from T-1 to 0."""
        if num_steps is None or num_steps >= self.timesteps:
            return list(range(self.timesteps - 1, -1, -1))
        if num_steps < 1:
            raise ConfigError(f"num_steps must be at least 1 (got {num_steps})")
        seq = torch.linspace(self.timesteps - 1, 0, num_steps, dtype=torch.float64).round().long().unique()
        return seq.flip(0).tolist()

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoiseSchedule:
        return cls(ScheduleConfig.from_dict(data))

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config})"
