"""Specification of ddpm_lightning.schedule: the DDPM forward process and its float64 buffers.

Every golden value here is either a literal number or computed independently in float64 with numpy from
the papers' formulas (Ho et al. 2020, Eqs. 4, 6-7; Nichol & Dhariwal 2021, Eq. 17); the code under test is
never used to produce its own expected values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.schedule import NoiseSchedule, extract, make_betas

BUFFER_NAMES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32, ~1.18e-38


# --------------------------------------------------------------------------------------------------------
# Independent float64 reference (numpy only)
# --------------------------------------------------------------------------------------------------------


def reference_betas(kind: str, T: int, beta_start=1e-4, beta_end=0.02, s=0.008, max_beta=0.999) -> np.ndarray:
    if kind == "linear":  # Ho et al. Sec. 4: beta_t = beta_start + t/(T-1) (beta_end - beta_start)
        return np.array([beta_start + (beta_end - beta_start) * t / (T - 1) for t in range(T)], dtype=np.float64)
    # Nichol & Dhariwal Eq. 17
    f = np.array([math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)], dtype=np.float64)
    abar = f / f[0]
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def reference_schedule(kind: str = "linear", T: int = 1000, **kw) -> dict[str, np.ndarray]:
    b = reference_betas(kind, T, **kw)
    a = 1.0 - b
    return reference_buffers(b, a, np.cumprod(a))


def reference_buffers(b: np.ndarray, a: np.ndarray, abar: np.ndarray) -> dict[str, np.ndarray]:
    """Every buffer from betas, alphas and abar by the papers' formulas (Eq. 4, Eq. 7), in numpy float64."""
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = b * (1.0 - abar_prev) / (1.0 - abar)  # Eq. 7, beta-tilde
    return dict(
        betas=b,
        alphas=a,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        sqrt_recip_alphas_cumprod=1.0 / np.sqrt(abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.concatenate([post_var[1:2], post_var[1:]]) if len(b) > 1 else b),
        posterior_mean_coef1=np.sqrt(abar_prev) * b / (1.0 - abar),  # Eq. 7, coefficient of x0
        posterior_mean_coef2=np.sqrt(a) * (1.0 - abar_prev) / (1.0 - abar),  # Eq. 7, coefficient of x_t
    )


def buf(schedule: NoiseSchedule, name: str) -> np.ndarray:
    return getattr(schedule, name).detach().cpu().numpy()


@pytest.fixture(scope="module")
def linear() -> NoiseSchedule:
    return NoiseSchedule("linear", 1000, 1e-4, 0.02)


@pytest.fixture(scope="module")
def cosine() -> NoiseSchedule:
    return NoiseSchedule("cosine", 1000)


@pytest.fixture(scope="module")
def steep() -> NoiseSchedule:
    """beta_end = 0.2: abar_999 ~ 2.1e-47 underflows float32."""
    return NoiseSchedule("linear", 1000, 1e-4, 0.2)


# --------------------------------------------------------------------------------------------------------
# Buffers: names, dtype, shape, literal golden values
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_buffers_have_exact_names_float64_and_shape_T(kind):
    s = NoiseSchedule(kind, 1000)
    names = {name for name, _ in s.named_buffers()}
    assert set(BUFFER_NAMES) <= names
    for name in BUFFER_NAMES:
        b = getattr(s, name)
        assert b.dtype == torch.float64, name
        assert tuple(b.shape) == (1000,), name
    assert s.num_timesteps == 1000


def test_linear_golden_literals(linear):
    assert buf(linear, "alphas_cumprod")[999] == pytest.approx(4.035830e-5, rel=1e-5)
    assert buf(linear, "posterior_variance")[1] == pytest.approx(5.453188e-5, rel=1e-5)
    assert abs(buf(linear, "posterior_mean_coef1")[0] - 1.0) <= 1e-6
    assert buf(linear, "posterior_mean_coef2")[0] == 0.0
    assert buf(linear, "posterior_variance")[0] == 0.0
    assert buf(linear, "betas")[0] == 1e-4
    assert buf(linear, "betas")[-1] == 0.02
    assert buf(linear, "alphas_cumprod_prev")[0] == 1.0
    np.testing.assert_array_equal(buf(linear, "alphas_cumprod_prev")[1:], buf(linear, "alphas_cumprod")[:-1])
    # log-variance: the t = 0 entry (log 0) is replaced by the t = 1 entry
    assert buf(linear, "posterior_log_variance_clipped")[0] == pytest.approx(math.log(5.453188e-5), abs=1e-5)


def test_cosine_golden_literals(cosine):
    # computed once with numpy float64 from Eq. 17 (s = 0.008, betas clipped at 0.999)
    assert buf(cosine, "betas")[0] == pytest.approx(4.128422482196914e-05, rel=1e-9)
    assert buf(cosine, "alphas_cumprod")[499] == pytest.approx(0.49384359044063775, rel=1e-9)
    assert buf(cosine, "betas")[-2] == pytest.approx(0.7499993929011166, rel=1e-9)
    assert buf(cosine, "betas")[-1] == pytest.approx(0.999, abs=1e-12)  # the clip is active only at t = 999
    assert (buf(cosine, "betas") >= 0.999 - 1e-12).sum() == 1
    assert buf(cosine, "alphas_cumprod")[999] == pytest.approx(2.4287669070348542e-09, rel=1e-6)


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("linear", dict(beta_start=1e-4, beta_end=0.02)),
        ("linear", dict(beta_start=1e-3, beta_end=0.2)),
        ("cosine", dict()),
        ("cosine", dict(s=0.05, max_beta=0.5)),
    ],
)
def test_all_buffers_match_independent_numpy_reference(kind, kw):
    ctor = dict(kw)
    if "s" in ctor:
        ctor["cosine_s"] = ctor.pop("s")
    s = NoiseSchedule(kind, 1000, **ctor)
    ref = reference_schedule(kind, 1000, **kw)
    for name in BUFFER_NAMES:
        np.testing.assert_allclose(buf(s, name), ref[name], rtol=1e-9, atol=0, err_msg=name)


def test_cosine_max_beta_clips_betas():
    s = NoiseSchedule("cosine", 100, max_beta=0.3)
    b = buf(s, "betas")
    assert b.max() == pytest.approx(0.3, abs=1e-15)
    assert b[-1] == pytest.approx(0.3, abs=1e-15)
    unclipped = reference_betas("cosine", 100, max_beta=1.0)
    assert (unclipped > 0.3).sum() >= 2  # the clip really did something
    np.testing.assert_allclose(b, np.minimum(unclipped, 0.3), rtol=1e-12)


def test_make_betas_returns_float64_in_open_unit_interval():
    for kind in ("linear", "cosine"):
        b = make_betas(kind, 50)
        assert b.dtype == torch.float64 and tuple(b.shape) == (50,)
        assert bool((b > 0).all()) and bool((b < 1).all())
    np.testing.assert_allclose(make_betas("linear", 5, 0.1, 0.5).numpy(), [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-15)


def test_single_timestep_schedule():
    s = NoiseSchedule("linear", 1, 0.5, 0.5)
    assert buf(s, "betas").tolist() == [0.5]
    assert buf(s, "alphas_cumprod").tolist() == [0.5]
    assert buf(s, "posterior_variance").tolist() == [0.0]
    assert buf(s, "posterior_mean_coef1")[0] == pytest.approx(1.0, abs=1e-12)
    assert np.isfinite(buf(s, "posterior_log_variance_clipped")).all()


# --------------------------------------------------------------------------------------------------------
# q_sample, predict_x0_from_eps, q_posterior_mean_variance
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_q_sample_hand_example(linear, dtype, tol):
    x0 = torch.full((3, 1, 2, 2), 0.5, dtype=dtype)
    noise = torch.full((3, 1, 2, 2), -1.0, dtype=dtype)
    t = torch.tensor([0, 500, 999])
    out = linear.q_sample(x0, t, noise)
    assert out.dtype == dtype and out.shape == x0.shape
    abar = reference_schedule("linear", 1000)["alphas_cumprod"][[0, 500, 999]]
    expected = np.sqrt(abar) * 0.5 + np.sqrt(1.0 - abar) * -1.0
    # literal sanity: at t = 0, sqrt(1 - 1e-4) * 0.5 - sqrt(1e-4) = 0.48997499...
    assert expected[0] == pytest.approx(0.5 * math.sqrt(1 - 1e-4) - 0.01, abs=1e-15)
    for i in range(3):
        np.testing.assert_allclose(out[i].double().numpy(), np.full((1, 2, 2), expected[i]), rtol=0, atol=tol)


def test_q_sample_mixed_per_sample_timesteps(cosine):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([999, 0, 17, 500, 998])
    abar = reference_schedule("cosine", 1000)["alphas_cumprod"][t.numpy()].reshape(5, 1, 1, 1)
    expected = np.sqrt(abar) * x0.numpy() + np.sqrt(1 - abar) * noise.numpy()
    np.testing.assert_allclose(cosine.q_sample(x0, t, noise).numpy(), expected, rtol=0, atol=1e-12)


def test_predict_x0_from_eps_inverts_q_sample(linear):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(64, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    t[:3] = torch.tensor([0, 999, 500])
    x_t = linear.q_sample(x0, t, noise)
    rec = linear.predict_x0_from_eps(x_t, t, noise)
    assert rec.dtype == torch.float64
    assert (rec - x0).abs().max().item() <= 1e-10
    # float32 path, up to t = 700 (1/sqrt(abar_700) ~ 17 amplifies the rounding of x_t)
    t32 = torch.randint(0, 701, (64,), generator=g)
    x0f, nf = x0.float(), noise.float()
    rec32 = linear.predict_x0_from_eps(linear.q_sample(x0f, t32, nf), t32, nf)
    assert rec32.dtype == torch.float32
    assert (rec32 - x0f).abs().max().item() <= 1e-5
    # a wrong eps gives a wrong x0 (the inversion actually uses eps)
    wrong = linear.predict_x0_from_eps(x_t, t, torch.zeros_like(noise))
    assert (wrong - x0).abs().max().item() > 0.1


def test_q_posterior_mean_variance_matches_eq7(linear):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    mean, var = linear.q_posterior_mean_variance(x0, x_t, t)
    ref = reference_schedule("linear", 1000)
    tn = t.numpy()
    b, abar, abar_prev = ref["betas"][tn], ref["alphas_cumprod"][tn], ref["alphas_cumprod_prev"][tn]
    c1 = (np.sqrt(abar_prev) * b / (1 - abar)).reshape(4, 1, 1, 1)
    c2 = (np.sqrt(1 - b) * (1 - abar_prev) / (1 - abar)).reshape(4, 1, 1, 1)
    expected_var = ((1 - abar_prev) / (1 - abar) * b).reshape(4, 1, 1, 1)
    assert mean.shape == x_t.shape and tuple(var.shape) == (4, 1, 1, 1)
    np.testing.assert_allclose(mean.numpy(), c1 * x0.numpy() + c2 * x_t.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), expected_var, rtol=1e-10, atol=0)
    # beta-tilde_t <= beta_t (posterior is narrower than the forward step)
    assert bool((var.flatten() <= torch.from_numpy(b)).all())


def test_q_posterior_at_t0_is_x0_with_zero_variance(linear):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    x_t = torch.randn(3, 1, 4, 4, generator=g) * 5
    mean, var = linear.q_posterior_mean_variance(x0, x_t, torch.zeros(3, dtype=torch.long))
    assert (mean - x0).abs().max().item() <= 1e-6
    assert bool((var == 0).all())


# --------------------------------------------------------------------------------------------------------
# beta_end = 0.2: abar underflows float32 but the coefficients the code uses stay finite
# --------------------------------------------------------------------------------------------------------


def test_steep_schedule_abar_underflows_float32(steep):
    abar999 = buf(steep, "alphas_cumprod")[999]
    assert abar999 == pytest.approx(2.0914203697434469e-47, rel=1e-6)  # literal, numpy float64
    f32 = float(np.float32(abar999))
    assert f32 == 0.0 or abs(f32) < FLOAT32_TINY
    assert float(steep.alphas_cumprod.float()[999]) < FLOAT32_TINY  # float32 abar is useless here


@pytest.mark.parametrize(
    "name",
    [
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ],
)
def test_steep_schedule_coefficients_finite_and_nonzero_in_float32(steep, name):
    v32 = getattr(steep, name).float()
    assert bool(torch.isfinite(v32).all()), name
    nonzero = v32[1:] if name in ("posterior_variance", "posterior_mean_coef2") else v32  # both are 0 at t=0
    assert bool((nonzero.abs() >= FLOAT32_TINY).all()), name
    if name == "sqrt_alphas_cumprod":
        assert float(v32[999]) == pytest.approx(4.573205e-24, rel=1e-5)
    if name == "sqrt_recip_alphas_cumprod":
        assert float(v32[999]) == pytest.approx(1.0 / 4.5732050e-24, rel=1e-5)


def test_steep_schedule_q_sample_and_extract_float32(steep):
    x0 = torch.full((3, 1, 4, 4), 0.5)
    noise = torch.full((3, 1, 4, 4), -1.0)
    t = torch.tensor([0, 500, 999])
    out = steep.q_sample(x0, t, noise)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert float(out[2].mean()) == pytest.approx(-1.0, abs=1e-6)
    c = extract(steep.sqrt_alphas_cumprod, t, x0)
    assert c.dtype == torch.float32 and float(c[2]) > 0
    rec = steep.predict_x0_from_eps(out, t, noise)
    assert bool(torch.isfinite(rec).all())  # 1/sqrt(abar_999) ~ 2.2e23 is representable in float32
    assert float(rec[0].mean()) == pytest.approx(0.5, abs=1e-6)


# --------------------------------------------------------------------------------------------------------
# dtype behaviour
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convert", ["half", "float", "to_float32", "to_bfloat16"])
def test_module_dtype_casts_keep_float64_buffers(convert):
    s = NoiseSchedule("linear", 100)
    before = {n: getattr(s, n).clone() for n in BUFFER_NAMES}
    if convert == "half":
        out = s.half()
    elif convert == "float":
        out = s.float()
    elif convert == "to_float32":
        out = s.to(torch.float32)
    else:
        out = s.to(dtype=torch.bfloat16)
    assert out is s
    for n in BUFFER_NAMES:
        assert getattr(s, n).dtype == torch.float64, n
        assert torch.equal(getattr(s, n), before[n]), n


def test_buffers_stay_float64_and_are_not_in_the_state_dict():
    """The buffers are a function of the schedule's config, so they are not persistent (a zero-terminal-SNR schedule's
    sqrt_recip_alphas_cumprod is infinite, which no checkpoint may hold); .half() keeps them float64, and a state_dict
    from before, which holds them, still loads (its copies are dropped)."""
    schedule = NoiseSchedule("cosine", 10).half()
    assert schedule.state_dict() == {}
    assert all(getattr(schedule, n).dtype == torch.float64 for n in BUFFER_NAMES)
    old = {n: torch.zeros(10, dtype=torch.float64) for n in BUFFER_NAMES}  # garbage: must not be loaded
    schedule.load_state_dict(old, strict=True)
    torch.testing.assert_close(schedule.betas, NoiseSchedule("cosine", 10).betas, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_extract_returns_x_dtype_and_broadcast_shape(linear, dtype):
    x = torch.zeros(3, 1, 5, 5, dtype=dtype)
    t = torch.tensor([0, 499, 999])
    out = extract(linear.alphas_cumprod, t, x)
    assert out.dtype == dtype
    assert tuple(out.shape) == (3, 1, 1, 1)
    expected = reference_schedule("linear", 1000)["alphas_cumprod"][[0, 499, 999]]
    np.testing.assert_allclose(out.double().flatten().numpy(), expected, rtol=1e-2 if dtype != torch.float64 else 1e-12)


def test_extract_rank_follows_x(linear):
    t = torch.tensor([3, 4])
    assert tuple(extract(linear.betas, t, torch.zeros(2, 7)).shape) == (2, 1)
    assert tuple(extract(linear.betas, t, torch.zeros(2, 3, 4, 5, 6)).shape) == (2, 1, 1, 1, 1)
    b = reference_betas("linear", 1000)
    np.testing.assert_allclose(
        extract(linear.betas, t, torch.zeros(2, 7, dtype=torch.float64)).flatten().numpy(), b[[3, 4]], rtol=1e-12
    )


# --------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key, value",
    [
        (dict(kind="quadratic"), "kind", "quadratic"),
        (dict(timesteps=0), "timesteps", 0),
        (dict(timesteps=1e3), "timesteps", 1e3),
        (dict(timesteps=True), "timesteps", True),
        (dict(beta_start=0), "beta_start", 0),
        (dict(beta_start=-1), "beta_start", -1),
        (dict(beta_end=1), "beta_end", 1),
        (dict(beta_end=1.5), "beta_end", 1.5),
        (dict(beta_start=0.03, beta_end=0.02), "beta_start", 0.03),
        (dict(kind="cosine", cosine_s=0), "cosine_s", 0),
        (dict(kind="cosine", max_beta=1), "max_beta", 1),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}" for k in v),
)
@pytest.mark.parametrize("factory", [NoiseSchedule, make_betas], ids=["NoiseSchedule", "make_betas"])
def test_bad_schedule_inputs_raise_config_error_naming_key_and_value(factory, kwargs, key, value):
    with pytest.raises(ConfigError) as info:
        factory(**kwargs)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"{key}={value!r}" in msg
    assert "\n" not in msg
    # the component names its own parameter; the config boundary adds the ``schedule.`` path (ConfigError.at)
    assert msg.startswith(f"{key}={value!r} is invalid: ")
    assert info.value.key == key
    assert "schedule." not in msg


def test_beta_start_above_beta_end_names_the_sibling_key_bare():
    with pytest.raises(ConfigError) as info:
        NoiseSchedule(beta_start=0.03, beta_end=0.02)
    assert str(info.value) == "beta_start=0.03 is invalid: must be <= beta_end=0.02"
    assert str(info.value.at("schedule")) == "schedule.beta_start=0.03 is invalid: must be <= beta_end=0.02"


def test_boundary_inputs_are_accepted():
    assert NoiseSchedule("linear", 3, 0.02, 0.02).num_timesteps == 3  # beta_start == beta_end is fine
    assert NoiseSchedule("linear", 1).num_timesteps == 1
    assert NoiseSchedule("cosine", 2, cosine_s=1e-6, max_beta=1e-3).num_timesteps == 2


# --------------------------------------------------------------------------------------------------------
# respaced(timesteps): Nichol & Dhariwal 2021 Sec. 4, against an independent numpy float64 computation
# --------------------------------------------------------------------------------------------------------


def reference_respaced(kind: str, T: int, kept: list[int], **kw) -> dict[str, np.ndarray]:
    """The respaced schedule from the papers' formulas alone: abar_i = abar_{t_i} (kept ascending),
    alpha_i = abar_{t_i} / abar_{t_{i-1}}, beta_i = 1 - alpha_i (abar_{t_{-1}} = 1), then Eq. 4 and Eq. 7."""
    abar = np.cumprod(1.0 - reference_betas(kind, T, **kw))[sorted(kept)]
    a = abar / np.concatenate([[1.0], abar[:-1]])
    return reference_buffers(1.0 - a, a, abar)


RESPACINGS = {
    "strided-7": [999, 832, 666, 500, 333, 166, 0],
    "leading-50": list(range(980, -1, -20)),
    "trailing-61": [int(v) - 1 for v in np.round(np.linspace(1000, 0, 61, endpoint=False))],
    "one-step-999": [999],
    "two-steps": [999, 0],
    "irregular-ascending": [0, 1, 2, 10, 500, 998],
}


@pytest.mark.parametrize("kept_name", list(RESPACINGS))
@pytest.mark.parametrize(
    "kind, kw",
    [("linear", dict(beta_start=1e-4, beta_end=0.02)), ("linear", dict(beta_start=1e-4, beta_end=0.2)), ("cosine", {})],
    ids=["linear", "beta_end=0.2", "cosine"],
)
def test_respaced_buffers_match_independent_numpy_reference(kind, kw, kept_name):
    kept = RESPACINGS[kept_name]
    s = NoiseSchedule(kind, 1000, **kw)
    r = s.respaced(kept)
    ref = reference_respaced(kind, 1000, kept, **kw)
    assert isinstance(r, NoiseSchedule) and r.num_timesteps == len(kept)
    for name in BUFFER_NAMES:
        b = getattr(r, name)
        assert b.dtype == torch.float64 and tuple(b.shape) == (len(kept),), name
        np.testing.assert_allclose(buf(r, name), ref[name], rtol=1e-9, atol=0, err_msg=name)
    # abar of the kept steps is the full schedule's, bit for bit; Eq. 7 at index 0 is x0 with no noise
    np.testing.assert_array_equal(buf(r, "alphas_cumprod"), buf(s, "alphas_cumprod")[sorted(kept)])
    assert buf(r, "alphas_cumprod_prev")[0] == 1.0 and buf(r, "posterior_variance")[0] == 0.0
    assert buf(r, "posterior_mean_coef2")[0] == 0.0
    # the coefficients the samplers use stay finite (and nonzero past index 0) in float32
    for name in (
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_mean_coef1",
        "posterior_variance",
    ):
        v32 = getattr(r, name).float()
        assert bool(torch.isfinite(v32).all()), name
        assert bool((v32[1:].abs() >= FLOAT32_TINY).all()), name


def test_respaced_betas_literal_and_alphas_keep_the_ratio(steep, linear):
    r = linear.respaced([999, 0])
    abar = reference_schedule("linear", 1000)["alphas_cumprod"]
    assert buf(r, "betas")[0] == pytest.approx(1e-4, rel=1e-12)  # abar_0 / 1
    assert buf(r, "betas")[1] == pytest.approx(1.0 - abar[999] / abar[0], rel=1e-12)
    assert buf(r, "betas")[1] > 10 * 0.02  # a stride's beta, not the schedule's beta_999
    # beta_end = 0.2, stride 832 -> 999: abar ratio ~5e-16; 1 - beta would keep few of its digits
    abar_steep = reference_schedule("linear", 1000, beta_end=0.2)["alphas_cumprod"]
    ratio = abar_steep[999] / abar_steep[832]
    assert ratio < 1e-14
    rs = steep.respaced([999, 832, 666, 500, 333, 166, 0])
    assert buf(rs, "alphas")[-1] == pytest.approx(ratio, rel=1e-12)
    assert abs((1.0 - buf(rs, "betas")[-1]) / ratio - 1.0) > 1e-6  # what 1 - beta would have given


def test_respaced_all_steps_is_the_schedule_itself_and_order_does_not_matter(linear):
    assert linear.respaced(range(1000)) is linear
    assert linear.respaced(list(range(999, -1, -1))) is linear
    a, b = linear.respaced([0, 500, 999]), linear.respaced([999, 0, 500])
    for name in BUFFER_NAMES:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # a respaced schedule keeps float64 under dtype casts like the full one
    assert a.half().posterior_variance.dtype == torch.float64


@pytest.mark.parametrize("kept", [[], [5, 5], [-1, 3], [1000], [2.0, 3]], ids=repr)
def test_respaced_rejects_bad_timesteps(linear, kept):
    with pytest.raises(ValueError, match=r"distinct integers in \[0, 999\]"):
        linear.respaced(kept)
