"""Specification of ddpm_lightning.samplers: DDPM (Ho et al. 2020, Alg. 2) and DDIM (Song et al. 2021, Eq. 12).

Expected values come from literal lists, numpy float64, or hand-written reference loops of the papers'
update rules that share nothing with the code under test except ``torch.randn`` for the per-step noise.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.samplers import (
    DDIMSampler,
    DDPMSampler,
    SampleOutput,
    Sampler,
    ddim_timesteps,
    strided_timesteps,
)
from ddpm_lightning.schedule import NoiseSchedule

SHAPE = (4, 1, 8, 8)


# --------------------------------------------------------------------------------------------------------
# Helpers: independent numpy schedule, eps functions
# --------------------------------------------------------------------------------------------------------


def np_linear_abar(T: int, beta_start: float, beta_end: float) -> tuple[np.ndarray, np.ndarray]:
    betas = np.array([beta_start + (beta_end - beta_start) * t / (T - 1) for t in range(T)], dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


def np_cosine_abar(T: int, s: float = 0.008, max_beta: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    f = np.array([math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)])
    betas = np.minimum(1.0 - (f[1:] / f[0]) / (f[:-1] / f[0]), max_beta)
    return betas, np.cumprod(1.0 - betas)


def point_mass_eps(schedule: NoiseSchedule, x0: torch.Tensor):
    """The exact eps predictor for a data distribution that is a point mass at x0:
    eps(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), from the schedule's float64 buffers cast to x's dtype."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sa = schedule.sqrt_alphas_cumprod.to(x.dtype)[t].view(-1, 1, 1, 1)
        sm = schedule.sqrt_one_minus_alphas_cumprod.to(x.dtype)[t].view(-1, 1, 1, 1)
        return (x - sa * x0.to(x.dtype)) / sm

    return eps


def smooth_eps(T: int):
    """A fixed smooth nonlinear 'network': tanh(0.7 x) + 0.1 t / T (dtype of x)."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.7 * x) + 0.1 * t.to(x.dtype).view(-1, 1, 1, 1) / T

    return eps


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SCHEDULES = {
    "linear": dict(kind="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02),
    "cosine": dict(kind="cosine", timesteps=1000),
    "beta_end=0.2": dict(kind="linear", timesteps=1000, beta_start=1e-4, beta_end=0.2),
}


@pytest.fixture(scope="module")
def schedules() -> dict[str, NoiseSchedule]:
    return {name: NoiseSchedule(**kw) for name, kw in SCHEDULES.items()}


@pytest.fixture(scope="module")
def linear(schedules) -> NoiseSchedule:
    return schedules["linear"]


# A covering set of sampler configurations (not the full product).
DDPM_CONFIGS = [
    ("fixed_small", True, None),
    ("fixed_small", False, None),
    ("fixed_large", True, None),
    ("fixed_large", False, None),
    ("fixed_small", True, 50),
    ("fixed_large", False, 50),
    ("fixed_small", False, 7),
    ("fixed_large", True, 7),
]
DDIM_CONFIGS = [  # (steps, eta, spacing, clip_denoised)
    (1000, 0.0, "leading", True),
    (1000, 1.0, "trailing", False),
    (1000, 0.5, "linspace", False),
    (50, 0.0, "leading", False),
    (50, 0.0, "trailing", True),
    (50, 0.0, "linspace", False),
    (50, 0.5, "leading", True),
    (50, 1.0, "trailing", False),
    (50, 1.0, "linspace", True),
    (10, 0.0, "linspace", True),
    (10, 0.5, "trailing", False),
    (10, 1.0, "leading", False),
    (10, 0.0, "leading", True),
    (1, 0.0, "leading", False),
    (1, 1.0, "linspace", False),
    (1, 0.5, "leading", True),
]


def make_sampler(cfg):
    if cfg[0] == "ddpm":
        return DDPMSampler(variance=cfg[1], clip_denoised=cfg[2], steps=cfg[3])
    return DDIMSampler(steps=cfg[1], eta=cfg[2], timestep_spacing=cfg[3], clip_denoised=cfg[4])


ALL_CONFIGS = [("ddpm", *c) for c in DDPM_CONFIGS] + [("ddim", *c) for c in DDIM_CONFIGS]


def cfg_id(cfg) -> str:
    return "-".join(str(v) for v in cfg)


# --------------------------------------------------------------------------------------------------------
# Timestep lists
# --------------------------------------------------------------------------------------------------------


def test_ddim_timesteps_leading_T1000_S50():
    assert ddim_timesteps(1000, 50, "leading") == list(range(980, -1, -20))


def test_ddim_timesteps_trailing_T1000_S50():
    ts = ddim_timesteps(1000, 50, "trailing")
    assert ts == list(range(999, 18, -20))
    assert ts[:3] == [999, 979, 959] and ts[-1] == 19


def test_ddim_timesteps_linspace_T1000_S50():
    ts = ddim_timesteps(1000, 50, "linspace")
    assert ts[:3] == [999, 979, 958]
    assert ts[-2:] == [20, 0]
    assert ts == [int(v) for v in np.round(np.linspace(0, 999, 50))[::-1]]
    assert len(ts) == 50


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_all_steps_is_every_timestep(spacing):
    assert ddim_timesteps(1000, 1000, spacing) == list(range(999, -1, -1))
    assert all(type(t) is int for t in ddim_timesteps(1000, 1000, spacing))


def test_ddim_timesteps_small_literal_cases():
    assert ddim_timesteps(10, 5, "leading") == [8, 6, 4, 2, 0]
    assert ddim_timesteps(10, 5, "trailing") == [9, 7, 5, 3, 1]
    assert ddim_timesteps(10, 5, "linspace") == [9, 7, 4, 2, 0]  # round([0, 2.25, 4.5, 6.75, 9]), half-to-even
    assert ddim_timesteps(1000, 1, "leading") == [0]
    assert ddim_timesteps(1000, 1, "trailing") == [999]
    assert ddim_timesteps(1000, 1, "linspace") == [0]


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_ddim_timesteps_invariants_sweep(spacing):
    """For every T <= 80 and S in [1, T]: S distinct descending ints in [0, T-1]."""
    for T in range(1, 81):
        for S in range(1, T + 1):
            ts = ddim_timesteps(T, S, spacing)
            assert len(ts) == S, (T, S)
            assert ts == sorted(set(ts), reverse=True), (T, S)
            assert 0 <= ts[-1] and ts[0] <= T - 1, (T, S)
            assert ts[-1] == 0, (T, S)  # both spacings end at the clean-most step


@pytest.mark.parametrize("T, S", [(15, 13), (17, 7), (1000, 61), (1000, 103)])
def test_ddim_timesteps_trailing_returns_S_timesteps_in_range(T, S):
    """Regression: np.arange with a float step once returned S+1 values ending in timestep -1."""
    ts = ddim_timesteps(T, S, "trailing")
    assert len(ts) == S
    assert min(ts) >= 0 and max(ts) == T - 1


def test_ddim_timesteps_trailing_sweep():
    for T in range(1, 121):
        for S in range(1, T + 1):
            ts = ddim_timesteps(T, S, "trailing")
            assert len(ts) == S and ts == sorted(set(ts), reverse=True), (T, S)
            assert ts[0] == T - 1 and ts[-1] >= 0, (T, S)


def test_ddim_timesteps_trailing_invariants_where_arange_is_exact():
    """Trailing spacing for S dividing T (no float rounding in the step): T/S apart, first T-1, last T/S-1."""
    for T in (10, 12, 100, 1000):
        for S in [s for s in range(1, T + 1) if T % s == 0]:
            ts = ddim_timesteps(T, S, "trailing")
            k = T // S
            assert ts == list(range(T - 1, k - 2, -k)), (T, S)


def test_ddim_trailing_61_of_1000_samples(linear):
    x0 = torch.rand(SHAPE, generator=gen(0)) * 1.8 - 0.9
    out = DDIMSampler(steps=61, eta=0.0, timestep_spacing="trailing", clip_denoised=False)(
        point_mass_eps(linear, x0), linear, torch.randn(SHAPE, generator=gen(1))
    )
    assert (out.x0 - x0).abs().max().item() <= 1e-3


def test_strided_timesteps():
    assert strided_timesteps(1000, None) == list(range(999, -1, -1))
    assert strided_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert strided_timesteps(1000, 1) == [999]
    assert strided_timesteps(1000, 7) == [999, 832, 666, 500, 333, 166, 0]
    ts = strided_timesteps(1000, 10)
    assert ts[0] == 999 and ts[-1] == 0
    assert len(ts) == 10 and len(set(ts)) == 10
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert ts == [int(v) for v in np.round(np.linspace(0, 999, 10))[::-1]]


def test_strided_timesteps_invariants_sweep():
    for T in range(2, 81):
        for S in range(2, T + 1):
            ts = strided_timesteps(T, S)
            assert len(ts) == S and ts[0] == T - 1 and ts[-1] == 0, (T, S)
            assert ts == sorted(set(ts), reverse=True), (T, S)


def test_samplers_visit_their_timesteps_in_order_with_int64_batches(linear):
    seen: list[torch.Tensor] = []

    def eps(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    DDIMSampler(steps=10, timestep_spacing="linspace")(eps, linear, torch.randn(3, 1, 2, 2, generator=gen(0)))
    assert [int(t[0]) for t in seen] == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert all(t.dtype == torch.int64 and tuple(t.shape) == (3,) and bool((t == t[0]).all()) for t in seen)
    seen.clear()
    DDPMSampler(steps=7)(eps, linear, torch.randn(3, 1, 2, 2, generator=gen(0)))
    assert [int(t[0]) for t in seen] == [999, 832, 666, 500, 333, 166, 0]
    seen.clear()
    DDPMSampler()(eps, linear, torch.randn(3, 1, 2, 2, generator=gen(0)))
    assert [int(t[0]) for t in seen] == list(range(999, -1, -1))


# --------------------------------------------------------------------------------------------------------
# Point-mass oracle: every sampler recovers x0
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=cfg_id)
def test_point_mass_oracle_recovers_x0(schedules, schedule_name, cfg):
    """With the exact eps of a point mass at x0, every sampler ends at x0; and on the way every x_t stays on
    the forward marginal N(sqrt(abar_t) x0, (1 - abar_t) I) (residual std ~ 1) for all samplers that preserve
    it (DDPM fixed_small, DDIM any eta; fixed_large inflates the variance on purpose)."""
    schedule = schedules[schedule_name]
    sampler = make_sampler(cfg)
    n = len(sampler.timesteps(1000))
    x0 = torch.rand(SHAPE, generator=gen(0)) * 1.8 - 0.9
    noise = torch.randn(SHAPE, generator=gen(1))
    out = sampler(point_mass_eps(schedule, x0), schedule, noise, generator=gen(2), trajectory_every=max(1, n // 10))
    assert isinstance(out, SampleOutput)
    assert out.x0.dtype == torch.float32 and out.x0.shape == SHAPE
    assert (out.x0 - x0).abs().max().item() <= 1e-3
    if cfg[:2] != ("ddpm", "fixed_large"):
        abar = schedule.alphas_cumprod
        for t, frame in out.trajectory[1:-1]:
            resid = (frame.double() - abar[t].sqrt() * x0.double()) / (1 - abar[t]).sqrt()
            assert 0.8 <= resid.std().item() <= 1.25, t
            assert abs(resid.mean().item()) <= 0.25, t


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize(
    "cfg",
    [("ddim", 1, 0.0, "trailing", True), ("ddim", 1, 1.0, "trailing", False), ("ddpm", "fixed_small", False, 1)],
    ids=cfg_id,
)
def test_point_mass_oracle_single_jump_from_T_minus_1(schedules, schedule_name, cfg):
    """One step from t = 999 to x0 divides by sqrt(abar_999) (6e-3 linear, 5e-5 cosine): run in float64.
    (With beta_end = 0.2, sqrt(abar_999) ~ 5e-24 puts x0's trace in x_999 below float64 resolution, so no
    sampler can recover x0 in one jump there; that case is left out on purpose.)"""
    schedule = schedules[schedule_name]
    x0 = torch.rand(SHAPE, generator=gen(0), dtype=torch.float64) * 1.8 - 0.9
    noise = torch.randn(SHAPE, generator=gen(1), dtype=torch.float64)
    out = make_sampler(cfg)(point_mass_eps(schedule, x0), schedule, noise, generator=gen(2))
    assert out.x0.dtype == torch.float64
    assert (out.x0 - x0).abs().max().item() <= 1e-3


# --------------------------------------------------------------------------------------------------------
# DDIM(eta=1, all steps) == DDPM fixed_small
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, clip",
    [(torch.float64, False), (torch.float32, True)],
    ids=["float64-noclip", "float32-clip"],
)
def test_ddim_eta1_all_steps_equals_ddpm_fixed_small(linear, dtype, clip):
    noise = torch.randn(SHAPE, generator=gen(5), dtype=dtype)
    eps = smooth_eps(1000)
    ddim = DDIMSampler(steps=1000, eta=1.0, timestep_spacing="leading", clip_denoised=clip)(
        eps, linear, noise, generator=gen(7), trajectory_every=1000
    )
    ddpm = DDPMSampler("fixed_small", clip_denoised=clip)(eps, linear, noise, generator=gen(7), trajectory_every=1000)
    assert ddim.x0.dtype == dtype and ddpm.x0.dtype == dtype
    assert (ddim.x0 - ddpm.x0).abs().max().item() <= 1e-5
    # the unclamped final states agree too, and are not trivially saturated
    final_ddim, final_ddpm = ddim.trajectory[-1][1], ddpm.trajectory[-1][1]
    assert (final_ddim - final_ddpm).abs().max().item() <= 1e-5
    assert (ddpm.x0.abs() < 1).float().mean().item() > 0.2
    # and a different generator gives a different DDPM sample (the comparison is not vacuous)
    other = DDPMSampler("fixed_small", clip_denoised=clip)(eps, linear, noise, generator=gen(8))
    assert (other.x0 - ddpm.x0).abs().max().item() > 1e-2


# --------------------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------------------


def test_ddim_eta0_is_deterministic_and_draws_nothing(linear):
    noise = torch.randn(SHAPE, generator=gen(0))
    eps = smooth_eps(1000)
    g1, g2 = gen(1), gen(2)
    state1 = g1.get_state()
    a = DDIMSampler(steps=50, eta=0.0, clip_denoised=False)(eps, linear, noise, generator=g1)
    b = DDIMSampler(steps=50, eta=0.0, clip_denoised=False)(eps, linear, noise, generator=g2)
    assert torch.equal(a.x0, b.x0)
    assert torch.equal(g1.get_state(), state1)
    torch.manual_seed(123)
    c = DDIMSampler(steps=50, eta=0.0, clip_denoised=False)(eps, linear, noise)
    torch.manual_seed(456)
    d = DDIMSampler(steps=50, eta=0.0, clip_denoised=False)(eps, linear, noise)
    assert torch.equal(c.x0, a.x0) and torch.equal(d.x0, a.x0)


@pytest.mark.parametrize(
    "sampler", [DDIMSampler(steps=50, eta=0.5), DDIMSampler(steps=50, eta=1.0), DDPMSampler(steps=50)], ids=repr
)
def test_stochastic_samplers_depend_on_generator_only(linear, sampler):
    noise = torch.randn(SHAPE, generator=gen(0))
    eps = smooth_eps(1000)
    a = sampler(eps, linear, noise, generator=gen(1))
    a2 = sampler(eps, linear, noise, generator=gen(1))
    b = sampler(eps, linear, noise, generator=gen(2))
    assert torch.equal(a.x0, a2.x0)
    assert (a.x0 - b.x0).abs().max().item() > 1e-2


# --------------------------------------------------------------------------------------------------------
# Hand-written reference loops (float64, must match within 1e-10)
# --------------------------------------------------------------------------------------------------------

REF_SCHEDULES = {
    "linear-0.01-0.3": (
        dict(kind="linear", timesteps=10, beta_start=0.01, beta_end=0.3),
        lambda: np_linear_abar(10, 0.01, 0.3),
    ),
    "linear-1e-4-0.02": (
        dict(kind="linear", timesteps=10, beta_start=1e-4, beta_end=0.02),
        lambda: np_linear_abar(10, 1e-4, 0.02),
    ),
    "cosine": (dict(kind="cosine", timesteps=10), lambda: np_cosine_abar(10)),
}


@pytest.mark.parametrize("ref_name", list(REF_SCHEDULES))
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_matches_algorithm2_reference_loop(ref_name, variance, clip):
    kw, np_ref = REF_SCHEDULES[ref_name]
    schedule = NoiseSchedule(**kw)
    betas, abar = np_ref()
    T = len(betas)
    eps_fn = smooth_eps(T)
    shape = (3, 2, 4, 4)
    noise = torch.randn(shape, generator=gen(11), dtype=torch.float64)

    # Ho et al. Algorithm 2 (0-based t): x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps) + sigma_t z,
    # z ~ N(0, I) for t > 0 and z = 0 at t = 0. With clip: x0_hat clipped, mean from Eq. 7.
    g_ref = gen(12)
    x = noise.clone()
    for t in range(T - 1, -1, -1):
        eps = eps_fn(x, torch.full((shape[0],), t, dtype=torch.long))
        abar_prev = abar[t - 1] if t > 0 else 1.0
        if clip:
            x0_hat = ((x - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])).clamp(-1, 1)
            mean = (math.sqrt(abar_prev) * betas[t] / (1 - abar[t])) * x0_hat + (
                math.sqrt(1 - betas[t]) * (1 - abar_prev) / (1 - abar[t])
            ) * x
        else:
            mean = (x - betas[t] / math.sqrt(1 - abar[t]) * eps) / math.sqrt(1 - betas[t])
        if t > 0:
            var = betas[t] * (1 - abar_prev) / (1 - abar[t]) if variance == "fixed_small" else betas[t]
            x = mean + math.sqrt(var) * torch.randn(shape, generator=g_ref, dtype=torch.float64)
        else:
            x = mean

    g = gen(12)
    out = DDPMSampler(variance, clip_denoised=clip)(eps_fn, schedule, noise, generator=g, trajectory_every=T)
    assert out.x0.dtype == torch.float64
    assert (out.x0 - x.clamp(-1, 1)).abs().max().item() <= 1e-10
    # the unclamped final state (float32 frame) matches too, so saturation at +-1 cannot hide a mismatch
    torch.testing.assert_close(out.trajectory[-1][1].double(), x, rtol=1e-6, atol=1e-6)
    # exactly T - 1 noise draws, in the same order (no noise at the last step)
    assert torch.equal(g.get_state(), g_ref.get_state())


@pytest.mark.parametrize("ref_name", list(REF_SCHEDULES))
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_matches_eq12_reference_loop(ref_name, clip):
    kw, np_ref = REF_SCHEDULES[ref_name]
    schedule = NoiseSchedule(**kw)
    _, abar = np_ref()
    T, eta = len(abar), 0.5
    ts = [8, 6, 4, 2, 0]  # leading spacing, S = 5 of T = 10
    assert ddim_timesteps(T, 5, "leading") == ts
    eps_fn = smooth_eps(T)
    shape = (3, 2, 4, 4)
    noise = torch.randn(shape, generator=gen(21), dtype=torch.float64)

    # Song et al. Eq. 12 with sigma from Eq. 16; the last step goes to abar = 1 and draws no noise.
    g_ref = gen(22)
    x = noise.clone()
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, torch.full((shape[0],), t, dtype=torch.long))
        x0_hat = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma**2) * eps
        if a_prev < 1.0:
            assert sigma > 0
            x = x + sigma * torch.randn(shape, generator=g_ref, dtype=torch.float64)
        else:
            assert sigma == 0.0

    g = gen(22)
    out = DDIMSampler(steps=5, eta=eta, timestep_spacing="leading", clip_denoised=clip)(
        eps_fn, schedule, noise, generator=g, trajectory_every=5
    )
    assert (out.x0 - x.clamp(-1, 1)).abs().max().item() <= 1e-10
    # the unclamped final state (float32 frame) matches too, so saturation at +-1 cannot hide a mismatch
    torch.testing.assert_close(out.trajectory[-1][1].double(), x, rtol=1e-6, atol=1e-6)
    assert torch.equal(g.get_state(), g_ref.get_state())  # 4 draws for 5 steps


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps", [7, 50])
def test_respaced_ddpm_matches_reference_with_recomputed_betas(variance, clip, steps):
    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    _, abar = np_linear_abar(1000, 1e-4, 0.02)
    ts = [int(v) for v in np.round(np.linspace(0, 999, steps))[::-1]]
    eps_fn = smooth_eps(1000)
    shape = (3, 2, 4, 4)
    noise = torch.randn(shape, generator=gen(31), dtype=torch.float64)

    # Nichol & Dhariwal respacing: beta_i = 1 - abar[t_i] / abar[t_next] (abar = 1 after the last kept step),
    # then Algorithm 2 / Eq. 7 with those betas.
    g_ref = gen(32)
    x = noise.clone()
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        beta = 1.0 - a_t / a_prev
        eps = eps_fn(x, torch.full((shape[0],), t, dtype=torch.long))
        if clip:
            x0_hat = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
            mean = beta * math.sqrt(a_prev) / (1 - a_t) * x0_hat + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t) * x
        else:
            mean = (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(1 - beta)
        if i + 1 < len(ts):
            var = beta * (1 - a_prev) / (1 - a_t) if variance == "fixed_small" else beta
            x = mean + math.sqrt(var) * torch.randn(shape, generator=g_ref, dtype=torch.float64)
        else:
            x = mean

    g = gen(32)
    out = DDPMSampler(variance, clip_denoised=clip, steps=steps)(
        eps_fn, schedule, noise, generator=g, trajectory_every=steps
    )
    assert (out.x0 - x.clamp(-1, 1)).abs().max().item() <= 1e-10
    # the unclamped final state (float32 frame) matches too, so saturation at +-1 cannot hide a mismatch
    torch.testing.assert_close(out.trajectory[-1][1].double(), x, rtol=1e-6, atol=1e-6)
    assert torch.equal(g.get_state(), g_ref.get_state())  # steps - 1 draws
    # the original (un-respaced) betas would give a visibly different sample
    assert float(1.0 - abar[ts[0]] / abar[ts[1]]) > 10 * 0.02


# --------------------------------------------------------------------------------------------------------
# The samplers use the schedule's own (golden-tested) posterior buffers
# --------------------------------------------------------------------------------------------------------


def first_step(sampler, schedule, eps_fn, noise, seed):
    """x after the sampler's first step (float32 frame) and the generator's first draw, as float64."""
    out = sampler(eps_fn, schedule, noise, generator=gen(seed), trajectory_every=1)
    z = torch.randn(noise.shape, generator=gen(seed), dtype=noise.dtype)
    return out, out.trajectory[1][1].double(), z


@pytest.mark.parametrize("steps, index", [(None, 999), (7, 6), (50, 49)])
def test_ddpm_first_step_is_the_schedules_q_posterior(linear, steps, index):
    """One DDPM step (clip, fixed_small) is q_posterior_mean_variance of the (respaced) schedule at x0_hat =
    predict_x0_from_eps clipped, plus sqrt(variance) z: the methods the schedule's golden tests pin."""
    eps_fn = smooth_eps(1000)
    noise = torch.randn(SHAPE, generator=gen(41), dtype=torch.float64)
    ts = strided_timesteps(1000, steps)
    schedule = linear if steps is None else linear.respaced(ts)
    assert schedule.num_timesteps == len(ts) and ts[0] == 999
    i = torch.full((SHAPE[0],), index, dtype=torch.long)
    x0_hat = schedule.predict_x0_from_eps(noise, i, eps_fn(noise, torch.full_like(i, 999))).clamp(-1, 1)
    _, frame, z = first_step(DDPMSampler("fixed_small", clip_denoised=True, steps=steps), linear, eps_fn, noise, 42)
    mean, var = schedule.q_posterior_mean_variance(x0_hat, noise, i)
    torch.testing.assert_close(frame, (mean + var.sqrt() * z).float().double(), rtol=0, atol=1e-6)


# Each perturbation scales one buffer of a copy of the schedule at every t > 0 (index 0 is the noise-free last
# step); the sampler run on the copy must follow it exactly.
PERTURBATIONS = {
    "posterior_variance": 4.0,
    "posterior_mean_coef1": 0.5,
    "posterior_mean_coef2": 0.9,
}


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_ddpm_follows_a_perturbed_posterior_buffer(name):
    """Fails if DDPM re-derives Eq. 7 from abar instead of reading the schedule's posterior buffers."""
    base = NoiseSchedule("linear", 10, 0.01, 0.3)
    bent = copy.deepcopy(base)
    getattr(bent, name)[1:] *= PERTURBATIONS[name]
    eps_fn = smooth_eps(10)
    noise = torch.randn(SHAPE, generator=gen(51), dtype=torch.float64)
    sampler = DDPMSampler("fixed_small", clip_denoised=True)
    out_base, frame_base, _ = first_step(sampler, base, eps_fn, noise, 52)
    out_bent, frame_bent, z = first_step(sampler, bent, eps_fn, noise, 52)
    # the first step is Eq. 7 with the bent buffers, from the bent schedule's own q_posterior_mean_variance
    t = torch.full((SHAPE[0],), 9, dtype=torch.long)
    x0_hat = bent.predict_x0_from_eps(noise, t, eps_fn(noise, t)).clamp(-1, 1)
    mean, var = bent.q_posterior_mean_variance(x0_hat, noise, t)
    torch.testing.assert_close(frame_bent, (mean + var.sqrt() * z).float().double(), rtol=0, atol=1e-6)
    assert (frame_bent - frame_base).abs().max().item() > 1e-2
    assert (out_bent.x0 - out_base.x0).abs().max().item() > 1e-3


@pytest.mark.parametrize("name, eta", [("posterior_variance", 1.0), ("alphas_cumprod_prev", 0.0)])
def test_ddim_follows_perturbed_schedule_buffers(name, eta):
    """DDIM over all steps reads abar_prev and Eq. 16's sigma (eta * sqrt(posterior_variance)) from the schedule."""
    base = NoiseSchedule("linear", 10, 0.01, 0.3)
    bent = copy.deepcopy(base)
    getattr(bent, name)[1:] *= 0.5
    eps_fn = smooth_eps(10)
    noise = torch.randn(SHAPE, generator=gen(61), dtype=torch.float64)
    sampler = DDIMSampler(steps=10, eta=eta, clip_denoised=False)
    _, frame_base, _ = first_step(sampler, base, eps_fn, noise, 62)
    _, frame_bent, z = first_step(sampler, bent, eps_fn, noise, 62)
    # Song et al. Eq. 12 at t = 9 with the bent schedule's values
    c = {k: float(getattr(bent, k)[9]) for k in ("alphas_cumprod", "alphas_cumprod_prev", "posterior_variance")}
    eps = eps_fn(noise, torch.full((SHAPE[0],), 9))
    x0_hat = (noise - math.sqrt(1 - c["alphas_cumprod"]) * eps) / math.sqrt(c["alphas_cumprod"])
    sigma = eta * math.sqrt(c["posterior_variance"])
    expected = math.sqrt(c["alphas_cumprod_prev"]) * x0_hat + math.sqrt(1 - c["alphas_cumprod_prev"] - sigma**2) * eps
    if eta > 0:
        expected = expected + sigma * z
    torch.testing.assert_close(frame_bent, expected.float().double(), rtol=0, atol=1e-5)
    assert (frame_bent - frame_base).abs().max().item() > 1e-2


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_strided_ddpm_is_full_ddpm_on_the_respaced_schedule(linear, variance, clip):
    """DDPM with steps=S is exactly DDPM over every step of schedule.respaced(visited steps), the model seeing
    the original timesteps: respacing has one definition."""
    ts = strided_timesteps(1000, 7)
    respaced = linear.respaced(ts)
    eps_fn = smooth_eps(1000)
    ascending = torch.tensor(sorted(ts))

    def eps_on_respaced(x, i):
        return eps_fn(x, ascending[i])

    noise = torch.randn(SHAPE, generator=gen(71), dtype=torch.float64)
    a = DDPMSampler(variance, clip_denoised=clip, steps=7)(eps_fn, linear, noise, generator=gen(72))
    b = DDPMSampler(variance, clip_denoised=clip)(eps_on_respaced, respaced, noise, generator=gen(72))
    assert torch.equal(a.x0, b.x0)


def test_sampler_is_the_public_base_and_check_validates_steps_against_T():
    assert issubclass(DDPMSampler, Sampler) and issubclass(DDIMSampler, Sampler)
    assert DDIMSampler(steps=50).check(1000) is None
    assert DDIMSampler(steps=10).check(10) is None
    assert DDPMSampler().check(1) is None  # every step of any schedule
    assert DDPMSampler(steps=7).check(7) is None
    for sampler in (DDIMSampler(steps=50), DDPMSampler(steps=50)):
        with pytest.raises(ConfigError) as info:
            sampler.check(10)
        assert str(info.value) == "steps=50 is invalid: must be an integer in [1, 10] (the schedule's timesteps)"
        assert info.value.key == "steps" and info.value.value == 50
        assert str(info.value.at("sampler")).startswith("sampler.steps=50 is invalid: ")
    # timesteps(T) still returns the visited steps (and raises the same error)
    assert DDIMSampler(steps=5).timesteps(10) == [8, 6, 4, 2, 0]
    with pytest.raises(ConfigError, match=r"^steps=50 is invalid"):
        DDIMSampler(steps=50).timesteps(10)


# --------------------------------------------------------------------------------------------------------
# Trajectory
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, every",
    [
        (DDIMSampler(steps=10, eta=0.0, timestep_spacing="linspace", clip_denoised=False), 3),
        (DDIMSampler(steps=10, eta=0.0, timestep_spacing="linspace", clip_denoised=False), 5),
        (DDIMSampler(steps=10, eta=0.0, timestep_spacing="linspace", clip_denoised=False), 1),
        (DDIMSampler(steps=10, eta=0.0, timestep_spacing="leading", clip_denoised=False), 10),
        (DDIMSampler(steps=10, eta=0.0, timestep_spacing="trailing", clip_denoised=False), 25),
        (DDPMSampler("fixed_small", clip_denoised=False, steps=7), 2),
    ],
    ids=lambda v: repr(v) if not isinstance(v, int) else f"every={v}",
)
def test_trajectory_frames(linear, sampler, every):
    ts = sampler.timesteps(1000)
    n = len(ts)
    x0 = torch.full(SHAPE, 1.5)  # outside [-1, 1]: the final frame is unclamped, out.x0 is clamped
    x0[:, :, :4] = -0.25
    noise = torch.randn(SHAPE, generator=gen(0))
    out = sampler(point_mass_eps(linear, x0), linear, noise, generator=gen(1), trajectory_every=every)
    frames = out.trajectory
    labels = [t for t, _ in frames]
    assert len(frames) == 1 + math.ceil(n / every)
    assert labels == [ts[0]] + [ts[j] for j in range(every, n, every)] + [-1]
    assert all(f.dtype == torch.float32 and f.device.type == "cpu" and f.shape == SHAPE for _, f in frames)
    assert torch.equal(frames[0][1], noise)
    final = frames[-1][1]
    assert (final - x0).abs().max().item() <= 1e-4  # unclamped: ~1.5 where x0 = 1.5
    assert final.max().item() > 1.4
    assert torch.equal(out.x0, final.clamp(-1, 1))
    if isinstance(sampler, DDIMSampler):
        # eta = 0 with the point-mass oracle: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_T at each label t
        _, abar = np_linear_abar(1000, 1e-4, 0.02)
        eps_T = (noise.double() - math.sqrt(abar[ts[0]]) * x0.double()) / math.sqrt(1 - abar[ts[0]])
        for t, f in frames[1:-1]:
            expected = math.sqrt(abar[t]) * x0.double() + math.sqrt(1 - abar[t]) * eps_T
            assert (f.double() - expected).abs().max().item() <= 1e-4, t


def test_trajectory_none_records_nothing(linear):
    out = DDIMSampler(steps=5)(smooth_eps(1000), linear, torch.randn(SHAPE, generator=gen(0)))
    assert out.trajectory == []


# --------------------------------------------------------------------------------------------------------
# Output range and robustness
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule_name", ["linear", "beta_end=0.2"])
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=cfg_id)
def test_output_in_unit_range_and_finite_with_random_eps(schedules, schedule_name, cfg):
    schedule = schedules[schedule_name]
    g_eps = gen(99)

    def random_eps(x, t):
        return 3.0 * torch.randn(x.shape, generator=g_eps, dtype=x.dtype)

    out = make_sampler(cfg)(
        random_eps, schedule, 2.0 * torch.randn(SHAPE, generator=gen(0)), generator=gen(1), trajectory_every=7
    )
    assert bool(torch.isfinite(out.x0).all())
    assert out.x0.min().item() >= -1.0 and out.x0.max().item() <= 1.0
    assert all(bool(torch.isfinite(f).all()) for _, f in out.trajectory)


# --------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, key, value",
    [
        (lambda: DDPMSampler(variance="big"), "variance", "big"),
        (lambda: DDPMSampler(steps=0), "steps", 0),
        (lambda: DDPMSampler(steps=2.5), "steps", 2.5),
        (lambda: DDIMSampler(steps=0), "steps", 0),
        (lambda: DDIMSampler(steps=True), "steps", True),
        (lambda: DDIMSampler(eta=-0.1), "eta", -0.1),
        (lambda: DDIMSampler(eta=float("nan")), "eta", float("nan")),
        (lambda: DDIMSampler(timestep_spacing="uniform"), "timestep_spacing", "uniform"),
        (lambda: ddim_timesteps(1000, 50, "uniform"), "timestep_spacing", "uniform"),
        (lambda: ddim_timesteps(1000, 1001, "leading"), "steps", 1001),
        (lambda: strided_timesteps(1000, 0), "steps", 0),
    ],
    ids=lambda v: "" if callable(v) else repr(v),
)
def test_bad_sampler_inputs_raise_config_error(build, key, value):
    with pytest.raises(ConfigError) as info:
        build()
    msg = str(info.value)
    assert f"{key}={value!r}" in msg
    assert "\n" not in msg
    # the sampler names its own parameter; the config boundary adds ``sampler.`` etc. (ConfigError.at)
    assert msg.startswith(f"{key}={value!r} is invalid: ")
    assert info.value.key == key


@pytest.mark.parametrize("sampler", [DDIMSampler(steps=2000), DDPMSampler(steps=2000)], ids=repr)
def test_steps_above_T_fail_at_call_naming_key_and_T(linear, sampler):
    with pytest.raises(ConfigError) as info:
        sampler(smooth_eps(1000), linear, torch.randn(SHAPE, generator=gen(0)))
    msg = str(info.value)
    assert "steps=2000" in msg and "1000" in msg
    assert msg == "steps=2000 is invalid: must be an integer in [1, 1000] (the schedule's timesteps)"
    assert str(info.value.at("callbacks.fid.sampler")).startswith("callbacks.fid.sampler.steps=2000 is invalid: ")


@pytest.mark.parametrize("every", [0, -3, 2.0])
def test_bad_trajectory_every(linear, every):
    called = []

    def eps(x, t):
        called.append(1)
        return torch.zeros_like(x)

    with pytest.raises(ConfigError) as info:
        DDIMSampler(steps=5)(eps, linear, torch.randn(SHAPE, generator=gen(0)), trajectory_every=every)
    assert f"trajectory_every={every!r}" in str(info.value)
    assert called == []  # raised before any work
