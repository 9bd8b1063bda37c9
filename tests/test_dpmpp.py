"""DPM-Solver++(2M): golden tests against diffusers' DPMSolverMultistepScheduler on the same network and noise, and the
sampler's contract (options, spacings, checkpoints).

Two kinds of golden test: ``test_dpmpp_matches_diffusers_own_spacings_and_defaults`` builds diffusers' scheduler with
its own defaults and names (only the schedule, ``prediction_type``, ``solver_order``, ``algorithm_type`` and
``timestep_spacing`` set) and lets it choose its timesteps; the older tests hand diffusers the timesteps the sampler
visits (``set_timesteps(timesteps=...)``) to pin the integrator at many step counts."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.samplers import DDIMSampler, DPMSolverSampler, ddim_timesteps, dpm_solver_timesteps
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

    scheduler = DPMSolverMultistepScheduler(
        trained_betas=schedule.betas.numpy(),
        prediction_type=prediction_type,
        solver_order=order,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=timesteps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(fn(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    return x


@pytest.mark.parametrize("objective", list(PREDICTION_TYPES))
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 14, 15, 20, 50])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_dpmpp_2m_matches_diffusers(objective, steps, spacing):
    """Same betas, network, x_T and visited timesteps (the sampler's own, handed to diffusers): the same final samples
    to float32 tolerance (diffusers keeps its schedule in float32, ours is float64), at step counts below, at and above
    diffusers' lower_order_final limit of 15."""
    schedule = NoiseSchedule("linear", 1000)
    fn = toy_network()
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    ours = DPMSolverSampler(steps, 2, spacing, clip_denoised=False)(fn, schedule, noise, objective=objective).x0
    visited = dpm_solver_timesteps(1000, steps, spacing)
    theirs = diffusers_sample(fn, schedule, noise, visited, PREDICTION_TYPES[objective], 2)
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["cosine", "sigmoid"])
def test_dpmpp_first_order_matches_diffusers_and_ddim_eta0(kind):
    """DPM-Solver++(1) is DDIM with eta = 0 (Lu et al. 2022, Sec. 3.1): all three agree."""
    schedule = NoiseSchedule(kind, 1000)
    fn = toy_network(1)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = DPMSolverSampler(12, 1, "trailing", clip_denoised=False)(fn, schedule, noise).x0
    theirs = diffusers_sample(fn, schedule, noise, dpm_solver_timesteps(1000, 12, "trailing"), "epsilon", 1)
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


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(order=3), "order"),
        (dict(order="2"), "order"),
        (dict(timestep_spacing="uniform"), "timestep_spacing"),
    ],
)
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
    scheduler = DPMSolverMultistepScheduler(
        trained_betas=schedule.betas.numpy(),
        prediction_type=PREDICTION_TYPES[objective],
        solver_order=order,
        algorithm_type="sde-dpmsolver++",
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=dpm_solver_timesteps(1000, steps, "trailing"))
    g, x = torch.Generator().manual_seed(9), noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        z = torch.randn(x.shape, generator=g, dtype=torch.float64) if i + 1 < steps else torch.zeros_like(x)
        x = scheduler.step(fn(x, torch.full((x.shape[0],), int(t))), t, x, variance_noise=z).prev_sample.double()
    torch.testing.assert_close(ours, x.clamp(-1, 1), rtol=0, atol=1e-4)
    ode = DPMSolverSampler(steps, order, "trailing", clip_denoised=False)(fn, schedule, noise).x0
    assert steps == 1 or float((ode - ours).abs().max()) > 1e-2  # the noise does enter


def test_sde_algorithm_is_checked():
    with pytest.raises(
        ConfigError, match=r"^algorithm='sde' is invalid: must be one of \['dpmsolver\+\+', 'sde-dpmsolver\+\+'\]$"
    ):
        DPMSolverSampler(algorithm="sde")


# ------------------------------------------------------------------------ diffusers' own spacings and defaults (#28)
#: The project's linear schedule (conf/schedule/linear.yaml) in diffusers' names.
DIFFUSERS_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def gaussian_data_oracle(schedule: NoiseSchedule, objective: str, mean: torch.Tensor, std: float):
    """The exact network for data x0 ~ N(mean, std^2 I) (each pixel independent): with x_t = alpha x0 + sigma eps,
    alpha^2 = abar_t, the posterior mean is ``E[x0 | x_t] = mean + alpha std^2 / (abar_t std^2 + 1 - abar_t) (x_t -
    alpha mean)`` (Gaussian conditioning), eps_hat = (x_t - alpha x0_hat) / sigma (Ho et al. 2020 Eq. 4) and
    v = alpha eps_hat - sigma x0_hat (Salimans & Ho 2022); returns the ``objective``'s target, in float64."""
    abar = schedule.alphas_cumprod.double()

    def fn(x_t, t):
        a = abar[t].view(-1, 1, 1, 1)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        x0 = mean + alpha * std**2 / (a * std**2 + 1 - a) * (x_t.double() - alpha * mean)
        eps = (x_t.double() - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[objective].to(x_t.dtype)

    return fn


def _oracle_and_noise(objective: str, seed: int = 0):
    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    grid = torch.linspace(-1, 1, 8, dtype=torch.float64)
    mean = 0.4 * torch.outer(grid, grid.flip(0)).view(1, 1, 8, 8)  # a fixed picture in [-0.4, 0.4]
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return schedule, gaussian_data_oracle(schedule, objective, mean, 0.3), noise


def _diffusers_run(scheduler, fn, noise, seed: int | None):
    """diffusers' own loop over ``scheduler.timesteps``; the SDE's noise (``variance_noise``) drawn from ``seed`` in
    the sampler's order (none is needed at the last step, where diffusers multiplies it by sigma = 0)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        z = None
        if g is not None:
            last = i + 1 == len(scheduler.timesteps)
            z = torch.zeros_like(x) if last else torch.randn(x.shape, generator=g, dtype=torch.float64)
        x = scheduler.step(fn(x, torch.full((x.shape[0],), int(t))), t, x, variance_noise=z).prev_sample.double()
    return x


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("objective", list(PREDICTION_TYPES))
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmpp_matches_diffusers_own_spacings_and_defaults(spacing, steps, order, objective, algorithm):
    """diffusers' DPMSolverMultistepScheduler with only the schedule, prediction_type, solver_order, algorithm_type and
    timestep_spacing set (final_sigmas_type, lower_order_final, euler_at_final, solver_type, thresholding ... at its
    defaults), choosing its own timesteps with ``set_timesteps(steps)``: the sampler visits the same timesteps and,
    on the same network (the Gaussian-data oracle) and x_T, gives the same samples to float32 tolerance."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        **DIFFUSERS_SCHEDULE,
        prediction_type=PREDICTION_TYPES[objective],
        solver_order=order,
        algorithm_type=algorithm,
        timestep_spacing=spacing,
    )
    scheduler.set_timesteps(steps)
    sampler = DPMSolverSampler(steps, order, spacing, clip_denoised=False, algorithm=algorithm)
    assert sampler.timesteps(1000) == scheduler.timesteps.tolist()
    assert min(sampler.timesteps(1000)) > 0  # no network evaluation is spent at t = 0
    schedule, fn, noise = _oracle_and_noise(objective)
    seed = 9 if algorithm == "sde-dpmsolver++" else None
    ours = sampler(fn, schedule, noise, generator=torch.Generator().manual_seed(9), objective=objective).x0
    theirs = _diffusers_run(scheduler, fn, noise, seed)
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_the_golden_test_sees_ddims_spacings(spacing):
    """Control: DDIM's spacings (the sampler's before issue #28) visit other timesteps than diffusers' DPM-Solver, and
    the samples then differ by far more than the golden test's tolerance, so that test can fail."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**DIFFUSERS_SCHEDULE, timestep_spacing=spacing)
    scheduler.set_timesteps(20)
    schedule, fn, noise = _oracle_and_noise("eps")
    old = ddim_timesteps(1000, 20, spacing)
    assert old != scheduler.timesteps.tolist() and old[-1] == 0
    theirs = _diffusers_run(scheduler, fn, noise, None)
    ddim_spaced = diffusers_sample(fn, schedule, noise, old, "epsilon", 2)
    assert float((ddim_spaced - theirs).abs().max()) > 0.05


def test_dpm_solver_timesteps_literal_cases():
    """The issue's table (T = 1000, S = 20) and small cases by hand."""
    assert dpm_solver_timesteps(1000, 20, "trailing") == list(range(999, 0, -50))
    assert dpm_solver_timesteps(1000, 20, "linspace")[:3] == [999, 949, 899]
    assert dpm_solver_timesteps(1000, 20, "linspace")[-2:] == [100, 50]
    assert dpm_solver_timesteps(1000, 20, "leading") == list(range(940, 0, -47))
    assert dpm_solver_timesteps(10, 4, "linspace") == [9, 7, 4, 2]  # round([0, 2.25, 4.5, 6.75, 9]) half to even
    assert dpm_solver_timesteps(10, 4, "leading") == [8, 6, 4, 2]  # 10 // 5 = 2
    assert dpm_solver_timesteps(10, 4, "trailing") == [9, 7, 4, 1]  # round([10, 7.5, 5, 2.5]) - 1, half to even
    assert dpm_solver_timesteps(1000, 1, "linspace") == [999] and dpm_solver_timesteps(1000, 1, "leading") == [500]
    assert dpm_solver_timesteps(1000, 999, "leading") == list(range(999, 0, -1))
    assert dpm_solver_timesteps(1000, 1000, "trailing") == list(range(999, -1, -1))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_solver_timesteps_equal_diffusers_at_every_step_count(spacing):
    """For every S that diffusers spaces without a spurious value: the same list; where numpy's arange with a float
    step gives one value too many (trailing, S = 61, 103, ...), diffusers' extra last t = -1 is the only difference."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**DIFFUSERS_SCHEDULE, timestep_spacing=spacing)
    extra = []
    for steps in range(1, 1000 if spacing != "trailing" else 1001):
        scheduler.set_timesteps(steps)
        theirs, ours = scheduler.timesteps.tolist(), dpm_solver_timesteps(1000, steps, spacing)
        assert len(ours) == steps and ours == sorted(set(ours), reverse=True) and 0 <= ours[-1] and ours[0] <= 999
        if len(theirs) == steps + 1:
            extra.append(steps)
            assert theirs[:-1] == ours and theirs[-1] == -1, steps
        else:
            assert theirs == ours, steps
    assert (61 in extra and 103 in extra) if spacing == "trailing" else not extra


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpmpp_steps_above_T_minus_1_are_refused_for_spacings_of_steps_plus_1_points(spacing):
    with pytest.raises(
        ConfigError,
        match=rf"^steps=1000 is invalid: must be an integer in \[1, 999\] with "
        rf"timestep_spacing='{spacing}', which spaces steps \+ 1 points",
    ):
        DPMSolverSampler(1000, timestep_spacing=spacing).check(1000)
    DPMSolverSampler(1000, timestep_spacing="trailing").check(1000)
    DPMSolverSampler(999, timestep_spacing=spacing).check(1000)
