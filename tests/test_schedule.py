"""The noise schedule (docs/method.md section 1): closed forms, forward process, P2 weight, sampler."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gsd_wsi.errors import ConfigError
from gsd_wsi.nn import NoiseSchedule, ScheduleConfig


def closed_form_betas(kind: str, T: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    if kind == "quadratic":
        return np.linspace(math.sqrt(start), math.sqrt(end), T) ** 2
    if kind == "linear":
        return np.linspace(start, end, T)
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)])


@pytest.mark.parametrize("kind", ["quadratic", "linear", "cosine"])
def test_betas_match_the_closed_forms(kind: str) -> None:
    sched = NoiseSchedule(ScheduleConfig(kind=kind))
    expected = closed_form_betas(kind, 1000)
    assert sched.betas.dtype == torch.float32 and sched.betas.shape == (1000,)
    np.testing.assert_allclose(sched.betas.numpy(), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - sched.betas.double().numpy()),
                               rtol=1e-5, atol=1e-9)


def test_quadratic_endpoints_are_the_method_values() -> None:
    betas = NoiseSchedule().betas
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-6)


@pytest.mark.parametrize(("kind", "monai_name"), [
    ("quadratic", "scaled_linear_beta"), ("linear", "linear_beta"), ("cosine", "cosine"),
])
def test_betas_agree_with_monai(kind: str, monai_name: str) -> None:
    from monai.networks.schedulers import DDPMScheduler

    ours = NoiseSchedule(ScheduleConfig(kind=kind))
    theirs = DDPMScheduler(1000, schedule=monai_name)
    # MONAI builds its tables in float32 (cosine's 1 - f(t+1)/f(t) loses digits); ours in float64
    torch.testing.assert_close(ours.betas, theirs.betas.float(), rtol=1e-3, atol=5e-5)


def test_add_noise_is_the_forward_process() -> None:
    sched = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 499, 999])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(x0, eps, t), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)


def test_add_noise_keeps_dtype_and_leaves_the_tables_alone() -> None:
    sched = NoiseSchedule()
    before = sched.alphas_cumprod.clone()
    x0 = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)
    out = sched.add_noise(x0, torch.ones_like(x0), torch.tensor([1, 2]))
    assert out.dtype == torch.bfloat16
    assert sched.alphas_cumprod.dtype == torch.float32 and torch.equal(sched.alphas_cumprod, before)


def test_p2_weight() -> None:
    sched = NoiseSchedule()
    t = torch.arange(1000)
    abar = torch.from_numpy(np.cumprod(1 - closed_form_betas("quadratic", 1000)))
    torch.testing.assert_close(sched.p2_weight(t), (1 - abar).float(), rtol=1e-5, atol=1e-7)
    snr = abar / (1 - abar)
    torch.testing.assert_close(sched.snr(t), snr.float())
    general = (1 / (0.5 + snr) ** 2).float()
    torch.testing.assert_close(sched.p2_weight(t, k=0.5, gamma=2.0), general, rtol=1e-5, atol=0)
    assert sched.p2_weight(5).ndim == 0


def test_sample_timesteps_are_uniform_and_reproducible() -> None:
    sched = NoiseSchedule(ScheduleConfig(timesteps=10))
    a = sched.sample_timesteps(5000, generator=torch.Generator().manual_seed(3))
    b = sched.sample_timesteps(5000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert a.min() == 0 and a.max() == 9
    assert torch.bincount(a, minlength=10).min() > 400


def test_step_at_t0_returns_the_clipped_x0_estimate() -> None:
    sched = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 3, 8, 8, generator=g) * 1.5
    eps = torch.randn(2, 3, 8, 8, generator=g) * 0.01
    abar0 = sched.alphas_cumprod[0].double()
    x0_hat = ((x_t.double() - (1 - abar0).sqrt() * eps.double()) / abar0.sqrt()).clamp(-1, 1).float()
    out_a = sched.step(eps, 0, x_t, generator=torch.Generator().manual_seed(5))
    out_b = sched.step(eps, 0, x_t, generator=torch.Generator().manual_seed(6))
    assert torch.equal(out_a, out_b)                    # no noise at t = 0
    torch.testing.assert_close(out_a, x0_hat, atol=1e-5, rtol=0)
    assert out_a.abs().max() <= 1.0


def test_step_is_deterministic_given_a_generator() -> None:
    sched = NoiseSchedule()
    x_t, eps = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    a = sched.step(eps, 500, x_t, generator=torch.Generator().manual_seed(9))
    b = sched.step(eps, 500, x_t, generator=torch.Generator().manual_seed(9))
    c = sched.step(eps, 500, x_t, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ConfigError):
        sched.step(eps, 1000, x_t)


@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_step_agrees_with_monai(t: int) -> None:
    from monai.networks.schedulers import DDPMScheduler

    ours = NoiseSchedule()
    theirs = DDPMScheduler(1000, schedule="scaled_linear_beta", clip_sample=True, variance_type="fixed_small")
    x_t, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    a = ours.step(eps, t, x_t, generator=torch.Generator().manual_seed(4))
    b, _ = theirs.step(eps, t, x_t, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_steps", [None, 10])
def test_oracle_sampling_follows_the_forward_marginals_and_ends_at_x0(num_steps: int | None) -> None:
    """An oracle returning the true noise of a known x0: each visited x_t ~ q(x_t | x0), the end is x0.

    A 50-step schedule with the betas scaled by 1000 / 50 (as DDPM re-scaling does), so that
    abar_T ~ 0 and the pure-noise start is itself a draw of q(x_T | x0).
    """
    sched = NoiseSchedule(ScheduleConfig(timesteps=50, beta_start=2e-3, beta_end=0.4))
    assert sched.alphas_cumprod[-1] < 1e-3
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 48, 48, generator=g) * 1.8 - 0.9
    abar = sched.alphas_cumprod.double()
    visited: list[int] = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t[0]]
        resid = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()      # the true noise, ~ N(0, 1)
        assert abs(resid.mean().item()) < 0.03 and abs(resid.std().item() - 1) < 0.03
        visited.append(int(t[0]))
        return resid.float()

    done: list[int] = []
    out = sched.sample(oracle, x0.shape, generator=torch.Generator().manual_seed(1), progress=done.append,
                       num_steps=num_steps)
    assert visited == sched.sampling_timesteps(num_steps) and visited[0] == 49 and visited[-1] == 0
    assert done == list(range(1, len(visited) + 1))
    assert len(visited) == (50 if num_steps is None else 10)
    torch.testing.assert_close(out, x0.float(), atol=1e-4, rtol=0)


def test_config_round_trips_through_json() -> None:
    sched = NoiseSchedule(ScheduleConfig(kind="cosine", timesteps=200))
    data = json.loads(json.dumps(sched.to_dict()))
    back = NoiseSchedule.from_dict(data)
    assert back.config == sched.config
    assert torch.equal(back.betas, sched.betas)


@pytest.mark.parametrize("bad", [
    {"kind": "sigmoid"},
    {"timesteps": 1},
    {"timesteps": 10.5},
    {"beta_start": 0.0},
    {"beta_start": 0.03, "beta_end": 0.02},
    {"beta_end": 1.0},
])
def test_bad_configs_raise(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ScheduleConfig(**bad)


def test_unknown_keys_raise() -> None:
    with pytest.raises(ConfigError, match="steps"):
        ScheduleConfig.from_dict({"steps": 10})
