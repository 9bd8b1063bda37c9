"""Prediction targets (eps, x0, v), Min-SNR weights per target, the sigmoid schedule and zero terminal SNR.

Golden values are written out here in float64 from the papers' formulas (math / numpy), independently of the code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.module import DDPM, derive_seed
from ddpm_lightning.networks import ADMUNetEps
from ddpm_lightning.objectives import (
    OBJECTIVES,
    check_objective,
    min_snr_weights,
    predict,
    target,
)
from ddpm_lightning.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler
from ddpm_lightning.schedule import NoiseSchedule, rescale_zero_terminal_snr


def tiny_net() -> ADMUNetEps:
    return ADMUNetEps(model_channels=32, channel_mult=(1,), num_blocks=1, attn_resolutions=(), dropout=0.0)


# ------------------------------------------------------------------------------------------------ the conversion
def test_targets_by_hand():
    """abar = 0.36: alpha = 0.6, sigma = 0.8; x0 = 1, eps = 0.5 -> x_t = 1.0, v = 0.6 * 0.5 - 0.8 * 1 = -0.5
    (Salimans & Ho 2022: v = alpha eps - sigma x0)."""
    x0, eps = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    assert float(target("eps", x0, eps, 0.6, 0.8)) == 0.5
    assert float(target("x0", x0, eps, 0.6, 0.8)) == 1.0
    assert float(target("v", x0, eps, 0.6, 0.8)) == pytest.approx(-0.5, abs=1e-15)
    x_t = torch.tensor([1.0], dtype=torch.float64)  # 0.6 * 1 + 0.8 * 0.5
    for objective, out in (("eps", 0.5), ("x0", 1.0), ("v", -0.5)):
        pred = predict(objective, torch.tensor([out], dtype=torch.float64), x_t, 0.6, 0.8)
        assert float(pred.x0) == pytest.approx(1.0, abs=1e-15), objective
        assert float(pred.eps) == pytest.approx(0.5, abs=1e-15), objective


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_predict_inverts_target_at_every_timestep(objective):
    schedule = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    alpha = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = schedule.q_sample(x0, t, eps)
    pred = predict(objective, target(objective, x0, eps, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(pred.x0, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(pred.eps, eps, rtol=0, atol=1e-9)


def test_v_is_defined_where_abar_is_zero_and_eps_is_not():
    x_t = torch.tensor([0.3], dtype=torch.float64)
    pred = predict("v", torch.tensor([0.7], dtype=torch.float64), x_t, 0.0, 1.0)
    assert float(pred.x0) == -0.7 and float(pred.eps) == 0.3  # x0 = -v, eps = x_t
    assert not bool(torch.isfinite(predict("eps", x_t, x_t, 0.0, 1.0).x0).all())


# ------------------------------------------------------------------------------------------------ Min-SNR weights
def test_min_snr_weights_of_each_target_golden():
    """Hang et al. 2023: eps min(SNR, g)/SNR, x0 min(SNR, g), v min(SNR, g)/(SNR + 1); linear schedule by hand."""
    abar_np = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    t = torch.tensor([0, 100, 500, 999])
    abar = NoiseSchedule("linear", 1000).alphas_cumprod
    for i, ti in enumerate(t.tolist()):
        snr = abar_np[ti] / (1 - abar_np[ti])
        expected = {"eps": min(snr, 5) / snr, "x0": min(snr, 5), "v": min(snr, 5) / (snr + 1)}
        for objective, value in expected.items():
            assert float(min_snr_weights(objective, abar, t, 5.0)[i]) == pytest.approx(value, rel=1e-6), (objective, ti)
    assert float(min_snr_weights("x0", abar, t[:1], 5.0)) == 5.0  # t = 0: SNR = 9999, clamped
    # where SNR <= gamma the v weight is SNR / (SNR + 1) = abar
    assert float(min_snr_weights("v", abar, t[-1:], 5.0)) == pytest.approx(abar_np[999], rel=1e-6)


def test_min_snr_weights_are_zero_at_zero_terminal_snr_for_x0_and_v():
    schedule = NoiseSchedule("linear", 1000, rescale_zero_terminal_snr=True)
    t = torch.tensor([999])
    assert float(min_snr_weights("v", schedule.alphas_cumprod, t, 5.0)) == 0.0
    assert float(min_snr_weights("x0", schedule.alphas_cumprod, t, 5.0)) == 0.0


# ------------------------------------------------------------------------------------------------ schedules
def lin_alg1(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, written out in numpy float64."""
    s = np.sqrt(np.cumprod(1 - betas))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    abar = s**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_zero_terminal_snr_golden(kind):
    plain = NoiseSchedule(kind, 1000)
    rescaled = NoiseSchedule(kind, 1000, rescale_zero_terminal_snr=True)
    np.testing.assert_allclose(rescaled.betas.numpy(), lin_alg1(plain.betas.numpy()), rtol=1e-12, atol=1e-15)
    assert float(rescaled.alphas_cumprod[-1]) == 0.0 and float(rescaled.betas[-1]) == 1.0
    assert float(rescaled.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-12)
    assert bool((rescaled.alphas_cumprod[1:] < rescaled.alphas_cumprod[:-1]).all())
    # the posterior is finite everywhere, so every sampler and the bound can use it
    for name in (
        "posterior_variance",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_log_variance_clipped",
    ):
        assert bool(torch.isfinite(getattr(rescaled, name)).all()), name


def test_zero_terminal_snr_on_the_papers_linear_schedule():
    """The issue's figure: abar_999 = 4.04e-5 for linear 1e-4..0.02, T = 1000; 0 after Algorithm 1; and the rescaled
    sqrt(abar) at t = 500 is (s_500 - s_999) s_0 / (s_0 - s_999)."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    assert float(NoiseSchedule().alphas_cumprod[-1]) == pytest.approx(4.04e-5, abs=5e-8)
    s = np.sqrt(abar)
    expected = ((s[500] - s[999]) * s[0] / (s[0] - s[999])) ** 2
    got = NoiseSchedule(rescale_zero_terminal_snr=True).alphas_cumprod
    assert float(got[500]) == pytest.approx(expected, rel=1e-12)


def test_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddim import (
        rescale_zero_terminal_snr as diffusers_rescale,
    )

    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(
        rescale_zero_terminal_snr(betas), diffusers_rescale(betas.clone()), rtol=1e-12, atol=1e-15
    )


def test_sigmoid_schedule_golden():
    """Chen 2023 Algorithm 1 (start -3, end 3, tau 1) by hand: abar(t) = (s(3) - s(6 t - 3)) / (s(3) - s(-3)) on
    t = i / T, beta_i = 1 - abar((i + 1) / T) / abar(i / T), clipped at 0.999."""

    def sig(v):
        return 1 / (1 + math.exp(-v))

    def abar(u):
        return (sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3))

    T = 1000
    schedule = NoiseSchedule("sigmoid", T)
    for i in (0, 1, 499, 900, 998):
        assert float(schedule.betas[i]) == pytest.approx(1 - abar((i + 1) / T) / abar(i / T), rel=1e-9), i
    assert float(schedule.betas[-1]) == 0.999  # abar(1) = 0: clipped
    assert float(schedule.alphas_cumprod[-1]) > 0
    steep = NoiseSchedule("sigmoid", T, sigmoid_start=0.0, sigmoid_end=3.0, sigmoid_tau=0.5)
    assert not torch.allclose(steep.betas, schedule.betas)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(kind="sigmoid", sigmoid_start=3.0, sigmoid_end=-3.0), "sigmoid_start"),
        (dict(kind="sigmoid", sigmoid_tau=0.0), "sigmoid_tau"),
        (dict(kind="sigmoid", sigmoid_end=float("nan")), "sigmoid_end"),
        (dict(kind="sigmoid", max_beta=1.0), "max_beta"),
        (dict(rescale_zero_terminal_snr="yes"), "rescale_zero_terminal_snr"),
        (dict(timesteps=1, rescale_zero_terminal_snr=True), "rescale_zero_terminal_snr"),
        (dict(kind="sigmoidal"), "kind"),
    ],
)
def test_schedule_options_reject_nonsense_in_one_line(kwargs, key):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid: ") as err:
        NoiseSchedule(**kwargs)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ the module
def test_objective_is_checked_and_eps_refused_at_zero_terminal_snr():
    with pytest.raises(ConfigError, match=r"^objective='v0' is invalid: must be one of \['eps', 'x0', 'v'\]$"):
        check_objective("v0")
    zero = NoiseSchedule(timesteps=50, rescale_zero_terminal_snr=True)
    with pytest.raises(
        ConfigError, match=r"^objective='eps' is invalid: schedule.rescale_zero_terminal_snr=true needs"
    ):
        DDPM(tiny_net(), zero)
    for objective in ("v", "x0"):
        assert DDPM(tiny_net(), zero, objective=objective).objective == objective


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_step_is_the_mse_on_the_objectives_target(objective):
    torch.manual_seed(0)
    schedule = NoiseSchedule(timesteps=100)
    model = DDPM(tiny_net(), schedule, seed=4, objective=objective)
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    loss = model.training_step((x0, torch.zeros(4, dtype=torch.long)), 0)
    torch.manual_seed(derive_seed(4, "train", 0, 0))
    t = torch.randint(0, 100, (4,))
    eps = torch.randn_like(x0)
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()).float()
    goal = {"eps": eps.double(), "x0": x0.double(), "v": abar.sqrt() * eps.double() - (1 - abar).sqrt() * x0.double()}
    expected = ((model.net(x_t, t).double() - goal[objective]) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def point_mass_oracle(objective: str, schedule: NoiseSchedule, x_star: torch.Tensor):
    """The exact network output of each objective for data that is the single image ``x_star``."""

    def fn(x_t, t):
        alpha = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        sigma = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t, x0 = x_t.double(), x_star.double().expand_as(x_t)
        eps = (x_t - alpha * x0) / sigma
        return target(objective, x0, eps, alpha, sigma).float()

    return fn


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize(
    "sampler",
    [
        DDPMSampler(steps=10),
        DDIMSampler(10, 0.0, "trailing"),
        DDIMSampler(10, 1.0, "trailing"),
        DPMSolverSampler(10, 2, "trailing"),
        DPMSolverSampler(7, 1, "linspace"),
    ],
    ids=repr,
)
def test_every_sampler_recovers_a_point_mass_with_every_objective(objective, zero_snr, sampler):
    if zero_snr and objective == "eps":
        pytest.skip("refused (x0_hat undefined at abar = 0)")
    schedule = NoiseSchedule(timesteps=200, rescale_zero_terminal_snr=zero_snr)
    x_star = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = sampler(
        point_mass_oracle(objective, schedule, x_star),
        schedule,
        noise,
        generator=torch.Generator().manual_seed(2),
        objective=objective,
    )
    torch.testing.assert_close(out.x0, x_star.expand(3, -1, -1, -1), rtol=0, atol=1e-4)


def test_sample_and_bound_use_the_models_objective():
    torch.manual_seed(0)
    schedule = NoiseSchedule(timesteps=20, rescale_zero_terminal_snr=True)
    model = DDPM(tiny_net(), schedule, objective="v", sampler=DPMSolverSampler(5))
    out = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out.x0).all())
    x0 = (torch.randint(0, 256, (2, 1, 32, 32)).float() / 255) * 2 - 1
    bound = model.variational_bound(x0, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(bound.summary()["bpd"])


# ------------------------------------------------------------------------------------------------ the command line
def test_cli_refuses_eps_with_zero_terminal_snr_in_one_line(tiny_train_overrides, tmp_path, run_command):
    proc = run_command("ddpm-train", [*tiny_train_overrides, "schedule.rescale_zero_terminal_snr=true"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: diffusion.objective='eps' is invalid: schedule.rescale_zero_terminal_snr"
    ), lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_refuses_an_unknown_objective_in_one_line(tiny_train_overrides, tmp_path, run_command):
    proc = run_command("ddpm-train", [*tiny_train_overrides, "diffusion.objective=noise"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: diffusion.objective='noise' is invalid: must be one of ['eps', 'x0', 'v']"


@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_v_zero_snr_run_trains_samples_and_refuses_a_resume_with_another_objective(
    tiny_train_overrides, tmp_path, run_command
):
    base = [
        *tiny_train_overrides,
        "schedule=sigmoid",
        "schedule.rescale_zero_terminal_snr=true",
        "diffusion.objective=v",
        "sampler=dpmpp",
        "sampler.steps=4",
        "callbacks.samples.sampler=null",
        "trainer.max_steps=2",
    ]
    proc = run_command("ddpm-train", base, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    from ddpm_lightning.checkpoint import load_ddpm

    model = load_ddpm(ckpt)
    assert model.objective == "v" and float(model.schedule.alphas_cumprod[-1]) == 0.0
    assert bool(torch.isfinite(model.sample(2, generator=torch.Generator().manual_seed(0)).x0).all())
    resume = run_command(
        "ddpm-train", [*base, "diffusion.objective=x0", f"ckpt_path={ckpt}", "trainer.max_steps=3"], cwd=tmp_path
    )
    assert resume.returncode == 2, resume.stderr[-2000:]
    lines = resume.stderr.strip().splitlines()
    assert len(lines) == 1 and "diffusion.objective='v' in the checkpoint, 'x0' in the config" in lines[0], lines
    sample = run_command(
        "ddpm-sample",
        [f"ckpt_path={ckpt}", "num_samples=2", "sampler.steps=3", f"out_dir={tmp_path / 's'}"],
        cwd=tmp_path,
    )
    assert sample.returncode == 0, sample.stderr[-2000:]


def test_a_checkpoint_from_before_the_objective_existed_resumes_as_eps():
    """Keys a checkpoint predates count as the value it was trained with (checkpoint.ADDED_KEYS)."""
    from ddpm_lightning.checkpoint import resume_mismatch

    old = {
        "model": {"model_channels": 32},
        "schedule": {"kind": "linear", "beta_end": 0.02},
        "diffusion": {"loss": "simple"},
    }
    new = {
        "model": {"model_channels": 32},
        "schedule": {"kind": "linear", "beta_end": 0.02, "rescale_zero_terminal_snr": False},
        "diffusion": {"loss": "simple", "objective": "eps"},
    }
    assert resume_mismatch(old, new) is None
    v = {**new, "diffusion": {"objective": "v"}}
    assert resume_mismatch(old, v) == "diffusion.objective='eps' in the checkpoint, 'v' in the config"
    zero = {**new, "schedule": {**new["schedule"], "rescale_zero_terminal_snr": True}}
    assert (
        resume_mismatch(old, zero) == "schedule.rescale_zero_terminal_snr=False in the checkpoint, True in the config"
    )
