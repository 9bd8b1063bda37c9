"""Specification of ddpm_lightning.losses (the variational bound, Ho et al. 2020 Eq. 5 / Sec. 3.3; learned variances
and L_hybrid, Nichol & Dhariwal 2021 Eqs. 15-16) and ddpm_lightning.timestep_sampling (importance sampling, Sec. 3.3).

Expected values come from reference implementations written here from the papers' formulas, element by element in
Python floats (math.erfc, math.log), that share nothing with the code under test: the schedule is rebuilt from the
betas with a Python loop, the posterior from Eqs. 6-7, the Gaussian CDF from erfc.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.losses import (
    Bound,
    bits_per_dim,
    check_loss,
    digit_mask,
    discretized_gaussian_log_likelihood,
    model_log_variance,
    model_mean,
    normal_kl,
    prior_kl,
    training_vb,
    variational_bound,
    vb_terms,
)
from ddpm_lightning.samplers import DDPMSampler
from ddpm_lightning.schedule import NoiseSchedule, check_variance
from ddpm_lightning.timestep_sampling import (
    HISTORY,
    UNIFORM_PROB,
    LossSecondMomentTimesteps,
    UniformTimesteps,
    make_timestep_sampler,
)


# ------------------------------------------------------------------------------------------------ references
def ref_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> dict[str, list[float]]:
    betas = [beta_start + (beta_end - beta_start) * t / (T - 1) for t in range(T)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    prev = [1.0] + abar[:-1]
    post_var = [betas[t] * (1 - prev[t]) / (1 - abar[t]) for t in range(T)]
    return {"betas": betas, "abar": abar, "prev": prev, "post_var": post_var}


def ref_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def ref_decoder_logp(x: float, mean: float, var: float) -> float:
    """log of the Gaussian mass on the pixel's bin [x - 1/255, x + 1/255], the edge bins open (Ho et al. Sec. 3.3)."""
    s = math.sqrt(var)
    hi = 1.0 if x > 1 - 1e-9 else ref_cdf((x + 1 / 255 - mean) / s)
    lo = 0.0 if x < -1 + 1e-9 else ref_cdf((x - 1 / 255 - mean) / s)
    return math.log(hi - lo) if hi > lo else -math.inf  # -inf: below float64's resolution of the CDF


def ref_kl(m1: float, v1: float, m2: float, v2: float) -> float:
    return 0.5 * (math.log(v2 / v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1.0)


def ref_term(sched: dict, x0: float, x_t: float, t: int, eps: float, var: float) -> float:
    """The bound's term at 0-based t for one pixel: the posterior (Eqs. 6-7) vs p_theta with the mean at the predicted
    x0 (clipped), the decoder at t = 0."""
    b, a, p = sched["betas"][t], sched["abar"][t], sched["prev"][t]
    x0_hat = max(-1.0, min(1.0, (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)))

    def post_mean(z0: float) -> float:
        return math.sqrt(p) * b / (1 - a) * z0 + math.sqrt(1 - b) * (1 - p) / (1 - a) * x_t

    if t == 0:
        return -ref_decoder_logp(x0, post_mean(x0_hat), var)
    return ref_kl(post_mean(x0), sched["post_var"][t], post_mean(x0_hat), var)


def grid_images(n: int, size: int = 4, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` float64 pixels on the 8-bit grid of [-1, 1], with both edge values present."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 256, (n, 1, size, size), generator=g)
    u[0, 0, 0, 0], u[0, 0, 0, 1] = 0, 255
    return u.double() / 255 * 2 - 1


# ------------------------------------------------------------------------------------------------ elementwise maths
def test_normal_kl_matches_the_closed_form():
    cases = [(0.3, -1.0, -0.2, 0.5), (0.0, 0.0, 0.0, 0.0), (2.0, -7.0, 1.5, -6.0), (-1.0, 1.0, 0.0, -2.0)]
    for m1, lv1, m2, lv2 in cases:
        got = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2)))
        assert float(got) == pytest.approx(ref_kl(m1, math.exp(lv1), m2, math.exp(lv2)), rel=1e-12, abs=1e-15)
    assert (
        float(
            normal_kl(
                *(torch.tensor(0.4, dtype=torch.float64),) * 2,
                torch.tensor(0.4, dtype=torch.float64),
                torch.tensor(0.4, dtype=torch.float64),
            )
        )
        == 0.0
    )


@pytest.mark.parametrize("mean, var", [(0.0, 1e-4), (0.37, 1e-3), (-0.99, 3e-5), (0.9, 0.5), (5.0, 1e-2), (-1.0, 1e-6)])
def test_discretized_decoder_matches_the_bins_and_sums_to_one(mean, var):
    pixels = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1
    logp = discretized_gaussian_log_likelihood(
        pixels, torch.tensor(mean, dtype=torch.float64), torch.tensor(math.log(var), dtype=torch.float64)
    )
    assert logp.dtype == torch.float64 and bool(torch.isfinite(logp).all())
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    for u in (0, 1, 2, 127, 128, 200, 254, 255):  # both edges and the bins next to them
        expected = ref_decoder_logp(float(pixels[u]), mean, var)
        if expected > -15:  # where 1 - CDF keeps its digits in the reference: compare the log-probabilities
            assert float(logp[u]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_discretized_decoder_is_accurate_in_the_far_tails():
    """A bin 30 sigma from the mean still gets a finite log-probability (1 - CDF would round to 0 in float64), close
    to the Gaussian tail asymptote log(phi(z) / z) of a bin much wider than where the mass sits."""
    x = torch.tensor([0.0], dtype=torch.float64)
    sigma = 0.5 / 255 / 30  # mean 30 sigma below the bin's lower edge
    mean = torch.tensor([-1 / 255 - 30 * sigma], dtype=torch.float64)
    logp = float(discretized_gaussian_log_likelihood(x, mean, torch.log(torch.tensor([sigma**2], dtype=torch.float64))))
    z = 30.0
    assert math.isfinite(logp)
    assert logp == pytest.approx(-0.5 * z * z - math.log(z * math.sqrt(2 * math.pi)), rel=2e-3)


def test_bits_per_dim_of_a_uniform_8bit_model_is_exactly_8():
    """A model that gives every one of the 256 values of every pixel probability 1/256 costs ln 256 nats a pixel:
    8 bits/dim over the 784 real pixels and over all 1024, whatever the padding (here also uniform)."""
    T, n = 10, 3
    terms = torch.zeros(n, T, dtype=torch.float64)
    terms[:, 0] = 784 * math.log(256)  # the decoder carries everything, the KL terms and the prior nothing
    bound = Bound(
        prior=torch.zeros(n, dtype=torch.float64),
        terms=terms,
        padding=torch.full((n,), 240 * math.log(256), dtype=torch.float64),
        num_dims=1024,
        num_real_dims=784,
    )
    s = bound.summary()
    assert s["bpd"] == pytest.approx(8.0, abs=1e-12) and s["decoder_bpd"] == pytest.approx(8.0, abs=1e-12)
    assert s["bpd_all_pixels"] == pytest.approx(8.0, abs=1e-12)
    assert s["vb_bpd"] == 0.0 and s["prior_bpd"] == 0.0 and s["bpd_stderr"] == 0.0
    assert sum(s["quartile_bpd"]) == pytest.approx(8.0, abs=1e-12) and s["quartile_bpd"][0] == pytest.approx(8.0)
    assert bits_per_dim(784 * math.log(256), 784) == pytest.approx(8.0, abs=1e-14)


# ------------------------------------------------------------------------------------------------ the terms
def test_prior_term_of_the_papers_linear_schedule_is_below_1e_minus_4_bits_per_dim():
    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    x0 = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).reshape(3, 1, 1, 1)  # |x0| = 1 is the worst case
    kl = prior_kl(schedule, x0)
    abar = ref_schedule(1000)["abar"][-1]
    for x, got in zip((-1.0, 0.0, 1.0), kl.flatten().tolist(), strict=True):
        assert got == pytest.approx(ref_kl(math.sqrt(abar) * x, 1 - abar, 0.0, 1.0), rel=1e-9)
    assert float(bits_per_dim(kl.max(), 1)) < 1e-4
    assert float(bits_per_dim(kl.max(), 1)) > 1e-6  # not zero: the test would catch a dropped term


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned"])
def test_vb_terms_match_the_papers_formulas_at_every_kind_of_step(variance):
    T = 20
    schedule, ref = NoiseSchedule("linear", T, 1e-3, 0.2), ref_schedule(T, 1e-3, 0.2)
    x0 = grid_images(5, 3)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 7, 19, 0])
    eps_true = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, eps_true)
    eps = eps_true + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # an imperfect prediction
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2.4 - 1.2  # also outside [-1, 1]
    mean = model_mean(schedule, x_t, t, schedule.predict_x0_from_eps(x_t, t, eps), clip_denoised=True)
    log_var = model_log_variance(schedule, t, x_t, variance, v)
    got = vb_terms(schedule, x0, x_t, t, mean, log_var)
    for i in range(5):
        ti = int(t[i])
        small = ref["post_var"][ti] if ti > 0 else ref["post_var"][1]
        large = ref["betas"][ti]
        for idx in [(0, 0, 0), (0, 1, 2), (0, 2, 1)]:
            vi = float(v[(i, *idx)])
            var = {
                "fixed_small": small,
                "fixed_large": large,
                "learned": math.exp((vi + 1) / 2 * math.log(large) + (1 - vi) / 2 * math.log(small)),
            }[variance]
            expected = ref_term(ref, float(x0[(i, *idx)]), float(x_t[(i, *idx)]), ti, float(eps[(i, *idx)]), var)
            assert float(got[(i, *idx)]) == pytest.approx(expected, rel=1e-8, abs=1e-12), (ti, idx)


def test_perfect_eps_gives_zero_kl_and_the_decoder_of_its_variance():
    schedule = NoiseSchedule("linear", 50, 1e-4, 0.05)
    x0 = grid_images(4, 4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def oracle(x_t, t):  # the true eps of the point mass at x0 (float64 inside)
        return (
            (x_t.double() - schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0)
            / schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        ), None

    t = torch.tensor([1, 10, 30, 49])
    x_t = schedule.q_sample(x0, t, noise)
    mean = model_mean(schedule, x_t, t, schedule.predict_x0_from_eps(x_t, t, oracle(x_t, t)[0]))
    kl = vb_terms(schedule, x0, x_t, t, mean, model_log_variance(schedule, t, x_t, "fixed_small"))
    assert float(kl.abs().max()) < 1e-9
    bound = variational_bound(oracle, schedule, x0.float().double(), generator=torch.Generator().manual_seed(2))
    s = bound.summary()
    assert s["vb_bpd"] < 1e-9
    # at t = 0 the mean is x0 itself: each pixel costs -log P(|N(0, beta~_1)| < 1/255), or the one-sided tail at an edge
    sigma = math.sqrt(ref_schedule(50, 1e-4, 0.05)["post_var"][1])
    inner, edge = ref_cdf(1 / 255 / sigma) - ref_cdf(-1 / 255 / sigma), ref_cdf(1 / 255 / sigma)
    flat = x0.flatten(1)
    n_edge = ((flat == -1) | (flat == 1)).sum(1).double()
    expected = -(n_edge * math.log(edge) + (16 - n_edge) * math.log(inner))
    torch.testing.assert_close(bound.terms[:, 0], expected, rtol=1e-9, atol=0)
    assert bound.terms.shape == (4, 50) and bound.forward_passes == 200


@pytest.mark.parametrize("v_value, fixed", [(-1.0, "fixed_small"), (1.0, "fixed_large")])
def test_learned_sigma_held_at_the_ends_is_the_fixed_model_bound_and_samples(v_value, fixed):
    """v = -1 is fixed_small and v = +1 fixed_large: the same bound (same eps draws) and the same samples, full and
    respaced (Nichol & Dhariwal Eq. 15 interpolates between exactly these two)."""
    schedule = NoiseSchedule("cosine", 40)

    def eps_only(x, t):
        return torch.tanh(0.8 * x) + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype)

    def with_v(x, t):
        return eps_only(x, t), torch.full_like(x, v_value)

    x0 = grid_images(3, 6).float().double()
    b_fixed = variational_bound(
        lambda x, t: (eps_only(x, t), None), schedule, x0, variance=fixed, generator=torch.Generator().manual_seed(5)
    )
    b_learned = variational_bound(with_v, schedule, x0, variance="learned", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(b_learned.terms, b_fixed.terms, rtol=1e-12, atol=1e-12)
    assert b_learned.summary()["bpd"] == pytest.approx(b_fixed.summary()["bpd"], rel=1e-12)
    for steps in (None, 9):
        noise = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        ref = DDPMSampler(fixed, steps=steps)(eps_only, schedule, noise, generator=torch.Generator().manual_seed(1))
        got = DDPMSampler("learned", steps=steps)(with_v, schedule, noise, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got.x0, ref.x0, rtol=1e-12, atol=1e-12)


def test_learned_variance_sampler_uses_the_respaced_betas():
    """Respaced to S steps, v = 0 gives sigma^2 = sqrt(beta_i beta~_i) of the *respaced* schedule: one step checked
    against betas recomputed here from abar at the kept steps."""
    T, S = 100, 5
    schedule, ref = NoiseSchedule("linear", T, 1e-4, 0.02), ref_schedule(T)
    sampler = DDPMSampler("learned", steps=S, clip_denoised=False)
    kept = sampler.timesteps(T)  # descending: 99, 74, 50, 25, 0
    first, second = kept[0], kept[1]
    beta = 1 - ref["abar"][first] / ref["abar"][second]
    beta_tilde = (1 - ref["abar"][second]) / (1 - ref["abar"][first]) * beta
    noise = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    seen = []

    def fn(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x), torch.zeros_like(x)

    z = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = sampler(fn, schedule, noise, generator=torch.Generator().manual_seed(4), trajectory_every=1)
    x1 = out.trajectory[1][1].double()  # after the first step: mean 0 (x_T = 0, eps = 0) + sigma z
    torch.testing.assert_close(x1, (math.sqrt(math.sqrt(beta * beta_tilde)) * z).float().double(), rtol=1e-6, atol=1e-7)
    assert seen == kept


# ------------------------------------------------------------------------------------------------ training losses
def test_training_vb_stops_the_gradient_of_the_mean_for_hybrid():
    schedule = NoiseSchedule("linear", 30)
    x0 = grid_images(2, 4)
    t = torch.tensor([0, 12])
    x_t = schedule.q_sample(x0, t, torch.randn_like(x0))
    for stop in (True, False):
        eps = torch.randn_like(x0, requires_grad=True)
        v = torch.zeros_like(x0, requires_grad=True)
        vb = training_vb(schedule, x0, x_t, t, schedule.predict_x0_from_eps(x_t, t, eps), v, stop_grad_mean=stop)
        assert vb.shape == (2,) and vb.dtype == torch.float32
        vb.sum().backward()
        assert (eps.grad is None or float(eps.grad.abs().sum()) == 0.0) == stop
        assert float(v.grad.abs().sum()) > 0
    mean = model_mean(schedule, x_t, t, schedule.predict_x0_from_eps(x_t, t, eps.detach()))
    log_var = model_log_variance(schedule, t, x_t, "learned", torch.zeros_like(x0))
    expected = vb_terms(schedule, x0, x_t, t, mean, log_var).flatten(1).sum(1)
    torch.testing.assert_close(vb.detach().double(), expected / (16 * math.log(2)), rtol=1e-6, atol=1e-9)


def test_loss_and_variance_options_refuse_nonsense_with_the_key():
    with pytest.raises(ConfigError, match=r"^loss='hybird' is invalid: must be one of \['simple', 'hybrid', 'vlb'\]"):
        check_loss("hybird", True, None)
    with pytest.raises(ConfigError, match="^loss='hybrid' is invalid: needs model.learn_sigma=true"):
        check_loss("hybrid", False, None)
    with pytest.raises(ConfigError, match="^loss='vlb' is invalid: has no MSE term for min_snr_gamma"):
        check_loss("vlb", True, 5.0)
    assert check_loss("vlb", False, None) == "vlb"
    with pytest.raises(ConfigError, match="^variance='learned' is invalid: the model has no variance output"):
        check_variance("learned", False)
    with pytest.raises(ConfigError, match="^nll_variance='big' is invalid: must be one of"):
        check_variance("big", True, key="nll_variance")
    with pytest.raises(ConfigError, match="^variance='learned' is invalid: the model has no variance output"):
        DDPMSampler("learned").check(1000, learn_sigma=False)
    DDPMSampler("learned").check(1000, learn_sigma=True)
    assert digit_mask().sum() == 784 and digit_mask().shape == (1, 32, 32) and not digit_mask()[0, 1, 5]


# ------------------------------------------------------------------------------------------------ importance sampling
def test_uniform_timesteps_have_weight_one():
    t, w = UniformTimesteps(50).sample(1000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 49 and bool((w == 1).all())


def test_loss_second_moment_is_uniform_until_every_t_has_its_history():
    T = 6
    s = LossSecondMomentTimesteps(T)
    for _ in range(HISTORY - 1):
        s.update(torch.arange(T), torch.ones(T))
    s.update(torch.arange(T - 1), torch.ones(T - 1))  # t = 5 has only HISTORY - 1 losses
    assert not s.warmed_up
    _, w = s.sample(100, generator=torch.Generator().manual_seed(0))
    assert bool((w == 1).all()) and torch.equal(s.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    s.update(torch.tensor([5]), torch.tensor([1.0]))
    assert s.warmed_up


def test_loss_second_moment_probabilities_weights_and_ring():
    T = 4
    s = LossSecondMomentTimesteps(T)
    for step in range(HISTORY + 3):  # t = 0..3 get losses 1, 2, 3, 4 (times a ramp); the ring keeps the last HISTORY
        s.update(torch.arange(T), torch.tensor([1.0, 2.0, 3.0, 4.0]) * (step + 1))
    recent = [(k + 1) for k in range(3, HISTORY + 3)]  # step + 1 for the last HISTORY steps
    rms = [c * math.sqrt(sum(r * r for r in recent) / HISTORY) for c in (1, 2, 3, 4)]
    expected = [r / sum(rms) * (1 - UNIFORM_PROB) + UNIFORM_PROB / T for r in rms]
    p = s.probabilities()
    assert p.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-15)
    assert float((p * (1.0 / (T * p))).sum()) == pytest.approx(1.0, abs=1e-15)  # E_p[w] = 1 exactly
    t, w = s.sample(200_000, generator=torch.Generator().manual_seed(1))
    assert float(w.double().mean()) == pytest.approx(1.0, abs=0.01)  # importance weights average 1
    torch.testing.assert_close(w.double(), 1.0 / (T * p[t]), rtol=1e-6, atol=0)
    freq = torch.bincount(t, minlength=T).double() / t.numel()
    torch.testing.assert_close(freq, p, atol=5e-3, rtol=0)
    # the weighted mean of any per-t loss estimates its uniform mean (unbiased)
    L = torch.tensor([0.5, 1.0, 7.0, 2.0], dtype=torch.float64)
    assert float((L[t] * w.double()).mean()) == pytest.approx(float(L.mean()), rel=0.02)


def test_loss_second_moment_state_round_trips():
    a = LossSecondMomentTimesteps(5)
    for k in range(30):
        a.update(torch.tensor([k % 5, (k * 3) % 5]), torch.tensor([k * 0.1, k * 0.2]))
    b = LossSecondMomentTimesteps(5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.probabilities(), b.probabilities())
    ta, wa = a.sample(50, generator=torch.Generator().manual_seed(3))
    tb, wb = b.sample(50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ta, tb) and torch.equal(wa, wb)
    with pytest.raises(ValueError, match="does not fit"):
        LossSecondMomentTimesteps(6).load_state_dict(a.state_dict())
    with pytest.raises(
        ConfigError,
        match=r"^timestep_sampler='importance' is invalid: must be one of \['uniform', 'loss-second-moment'\]",
    ):
        make_timestep_sampler("importance", 10)


def _reference_update(history: torch.Tensor, counts: torch.Tensor, t: torch.Tensor, losses: torch.Tensor) -> None:
    """The first version's update, one loss at a time: a full row shifts left and takes the new loss at the end."""
    size = history.shape[1]
    for step, loss in zip(t.tolist(), losses.double().tolist(), strict=True):
        if counts[step] == size:
            history[step, :-1] = history[step, 1:].clone()
            history[step, -1] = loss
        else:
            history[step, counts[step]] = loss
            counts[step] += 1


def test_the_vectorised_ring_keeps_the_same_losses_as_one_at_a_time():
    """Batches with repeated t (more than HISTORY of one t in one batch too): the same held losses, in the same
    order, as the loop of the first version; no host read in update or sample."""
    from ddpm_lightning.sync_census import SyncCensus

    g = torch.Generator().manual_seed(0)
    for T in (3, 7, 50):
        s = LossSecondMomentTimesteps(T)
        history, counts = torch.zeros(T, HISTORY, dtype=torch.float64), torch.zeros(T, dtype=torch.long)
        for k in range(40):
            batch = int(torch.randint(1, 4 * HISTORY, (1,), generator=g))
            t = torch.randint(0, T, (batch,), generator=g)
            losses = torch.rand(batch, generator=g)
            with SyncCensus() as census:
                s.update(t, losses)
                s.sample(8, generator=torch.Generator().manual_seed(k))
            assert census.count() == 0, census.summary()
            _reference_update(history, counts, t, losses)
            assert torch.equal(s.history, history) and torch.equal(s.counts, counts), (T, k)
        assert T == 50 or (s.warmed_up and bool((s.written > HISTORY).any()))  # the rings wrapped round


def test_a_checkpoint_of_the_first_version_resumes_the_same_sampler():
    """A state dict in the first version's layout (history oldest first, counts capped) loads into the same held
    losses and probabilities, and goes on as the loop would; today's state dict carries that layout too."""
    T = 5
    history, counts = torch.zeros(T, HISTORY, dtype=torch.float64), torch.zeros(T, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        t = torch.randint(0, T, (6,), generator=g)
        _reference_update(history, counts, t, torch.rand(6, generator=g) + 0.1)
    old = {"history": history.clone(), "counts": counts.clone()}
    s = LossSecondMomentTimesteps(T)
    s.load_state_dict(old)
    assert torch.equal(s.history, history) and torch.equal(s.counts, counts) and s.warmed_up
    rms = history.pow(2).mean(1).sqrt()
    expected = rms / rms.sum() * (1 - UNIFORM_PROB) + UNIFORM_PROB / T
    torch.testing.assert_close(s.probabilities(), expected, rtol=1e-12, atol=0)
    t, losses = torch.tensor([0, 0, 3, 4, 0]), torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])
    s.update(t, losses)
    _reference_update(history, counts, t, losses)
    assert torch.equal(s.history, history)
    state = s.state_dict()
    assert torch.equal(state["history"], history) and torch.equal(state["counts"], counts)
    assert {"ring", "written"} <= set(state) and all(v.device.type == "cpu" for v in state.values())
    again = LossSecondMomentTimesteps(T)
    again.load_state_dict(state)
    assert torch.equal(again.ring, s.ring) and torch.equal(again.probabilities(), s.probabilities())
