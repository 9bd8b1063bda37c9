"""DPM-Solver++(2M): golden tests against diffusers' DPMSolverMultistepScheduler on the same network and noise, and the
sampler's contract (options, spacings, checkpoints)."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.samplers import DDIMSampler, DPMSolverSampler, ddim_timesteps
from ddpm_lightning.schedule import NoiseSchedule

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def toy_network(seed: int = 0):
    """A fixed, t-dependent function of x_t with outputs in about [-1, 1], in float64 (a stand-in network)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64) * 0.4

    def fn(x_t, t):
        y = torch.nn.functional.conv2d(x_t.double(), weight, padding=1)
        return torch.tanh(y * (1 + t.double().view(-1, 1, 1, 1) / 1000)).to(x_t.dtype)

    return fn


def diffusers_sample(fn, schedule: NoiseSchedule, noise, timesteps, prediction_type: str, order: int):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(trained_betas=schedule.betas.numpy(), prediction_type=prediction_type,
                                            solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
                                            lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=timesteps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(fn(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    return x


@pytest.mark.parametrize("objective", list(PREDICTION_TYPES))
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 14, 15, 20, 50])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_dpmpp_2m_matches_diffusers(objective, steps, spacing):
    """Same betas, network, x_T and visited timesteps: the same final samples to float32 tolerance (diffusers keeps its
    schedule in float32, ours is float64), at step counts below, at and above diffusers' lower_order_final limit of 15."""
    schedule = NoiseSchedule("linear", 1000)
    fn = toy_network()
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    ours = DPMSolverSampler(steps, 2, spacing, clip_denoised=False)(fn, schedule, noise, objective=objective).x0
    theirs = diffusers_sample(fn, schedule, noise, ddim_timesteps(1000, steps, spacing), PREDICTION_TYPES[objective], 2)
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["cosine", "sigmoid"])
def test_dpmpp_first_order_matches_diffusers_and_ddim_eta0(kind):
    """DPM-Solver++(1) is DDIM with eta = 0 (Lu et al. 2022, Sec. 3.1): all three agree."""
    schedule = NoiseSchedule(kind, 1000)
    fn = toy_network(1)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = DPMSolverSampler(12, 1, "trailing", clip_denoised=False)(fn, schedule, noise).x0
    theirs = diffusers_sample(fn, schedule, noise, ddim_timesteps(1000, 12, "trailing"), "epsilon", 1)
    ddim = DDIMSampler(12, 0.0, "trailing", clip_denoised=False)(fn, schedule, noise).x0
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, ddim, rtol=0, atol=1e-9)


def test_second_order_differs_from_first_order():
    """A test that the multistep correction is applied at all (order 2 != order 1 after the first step)."""
    schedule = NoiseSchedule("linear", 1000)
    fn = toy_network(2)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = DPMSolverSampler(10, 1, clip_denoised=False)(fn, schedule, noise).x0
    second = DPMSolverSampler(10, 2, clip_denoised=False)(fn, schedule, noise).x0
    assert float((first - second).abs().max()) > 1e-3
    one = DPMSolverSampler(1, 2, clip_denoised=False)(fn, schedule, noise).x0  # one step: x0_hat at t = 999
    torch.testing.assert_close(one, DPMSolverSampler(1, 1, clip_denoised=False)(fn, schedule, noise).x0)


def test_dpmpp_visits_the_spacings_timesteps_and_calls_the_network_once_per_step():
    calls = []

    def fn(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    DPMSolverSampler(10)(fn, NoiseSchedule(), torch.randn(1, 1, 4, 4))
    assert calls == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


def test_dpmpp_clip_denoised_keeps_x0_hat_in_range():
    schedule = NoiseSchedule()
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = DPMSolverSampler(5, clip_denoised=True)(lambda x, t: -3 * torch.ones_like(x), schedule, noise, objective="x0")
    assert float(out.x0.max()) <= 1.0 and float(out.x0.min()) >= -1.0


@pytest.mark.parametrize("kwargs, key", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(order=3), "order"), (dict(order="2"), "order"),
    (dict(timestep_spacing="uniform"), "timestep_spacing"),
])
def test_dpmpp_rejects_nonsense_in_one_line(kwargs, key):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid: ") as err:
        DPMSolverSampler(**kwargs)
    assert "\n" not in str(err.value)


def test_dpmpp_steps_are_checked_against_the_schedule():
    with pytest.raises(ConfigError, match=r"^steps=2000 is invalid: must be an integer in \[1, 1000\]"):
        DPMSolverSampler(2000).check(1000)


def test_sampler_objective_is_checked():
    with pytest.raises(ConfigError, match=r"^objective='epsilon' is invalid"):
        DPMSolverSampler(2)(lambda x, t: x, NoiseSchedule(), torch.zeros(1, 1, 2, 2), objective="epsilon")


@pytest.mark.parametrize("objective", list(PREDICTION_TYPES))
@pytest.mark.parametrize("steps, order", [(1, 2), (5, 1), (10, 2), (20, 2)])
def test_sde_dpmpp_2m_matches_diffusers_with_the_same_noise(objective, steps, order):
    """SDE-DPM-Solver++(2M): the noise z of every step is drawn from the same generator in the same order and handed
    to diffusers as ``variance_noise``; the final samples agree to float32 tolerance."""
    from diffusers import DPMSolverMultistepScheduler

    schedule = NoiseSchedule("linear", 1000)
    fn = toy_network(3)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = DPMSolverSampler(steps, order, "trailing", clip_denoised=False, algorithm="sde-dpmsolver++")
    ours = sampler(fn, schedule, noise, generator=torch.Generator().manual_seed(9), objective=objective).x0
    scheduler = DPMSolverMultistepScheduler(trained_betas=schedule.betas.numpy(), prediction_type=PREDICTION_TYPES[objective],
                                            solver_order=order, algorithm_type="sde-dpmsolver++", final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=ddim_timesteps(1000, steps, "trailing"))
    g, x = torch.Generator().manual_seed(9), noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        z = torch.randn(x.shape, generator=g, dtype=torch.float64) if i + 1 < steps else torch.zeros_like(x)
        x = scheduler.step(fn(x, torch.full((x.shape[0],), int(t))), t, x, variance_noise=z).prev_sample.double()
    torch.testing.assert_close(ours, x.clamp(-1, 1), rtol=0, atol=1e-4)
    ode = DPMSolverSampler(steps, order, "trailing", clip_denoised=False)(fn, schedule, noise).x0
    assert steps == 1 or float((ode - ours).abs().max()) > 1e-2  # the noise does enter


def test_sde_algorithm_is_checked():
    with pytest.raises(ConfigError, match=r"^algorithm='sde' is invalid: must be one of \['dpmsolver\+\+', 'sde-dpmsolver\+\+'\]$"):
        DPMSolverSampler(algorithm="sde")
