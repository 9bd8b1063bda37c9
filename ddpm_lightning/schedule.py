"""The forward (noising) process of DDPM and the quantities derived from its variance schedule.

Sources
-------
* Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239 (the paper):
  linear schedule (Sec. 4), q(x_t | x_0) (Eq. 4), the posterior q(x_{t-1} | x_t, x_0) (Eqs. 6-7).
* Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672:
  the cosine schedule (Eq. 17, s = 0.008, betas clipped at 0.999).
* Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models", arXiv:2301.10972, Algorithm 1: the sigmoid
  schedule, defined on abar (the form lucidrains' denoising-diffusion-pytorch ``sigmoid_beta_schedule`` uses, from
  Jabri et al. 2022, arXiv:2212.11972), not GeoDiff's sigmoid in beta (Xu et al. 2022, arXiv:2203.02923).
* Lin, Liu, Li & Yang 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891,
  Algorithm 1: rescaling any schedule to zero terminal SNR (abar_{T-1} = 0).

Conventions
-----------
Timesteps are 0-based: ``t`` in ``[0, T-1]`` indexes the paper's step ``t+1``. ``alphas_cumprod[t]`` is
``abar_t = prod_{s<=t} (1 - beta_s)`` and ``alphas_cumprod_prev[0] = 1`` (the clean image).

Every quantity is computed in float64 and kept as a float64 buffer. Gathered coefficients are cast to the
dtype of the tensor they multiply, so a large ``beta_end`` (e.g. 0.2, where ``abar_999 ~ 1e-47`` underflows
float32) still gives finite coefficients such as ``sqrt(abar_t)`` (~5e-24, representable in float32).
This module does not import Lightning or Hydra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ddpm_lightning.errors import invalid, is_int, is_number

ScheduleKind = Literal["linear", "cosine", "sigmoid"]
SCHEDULE_KINDS = ("linear", "cosine", "sigmoid")


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Linearly spaced betas (Ho et al. 2020, Sec. 4: 1e-4 .. 0.02 over T = 1000).

    Returns float64 ``(timesteps,)``: ``beta_t = beta_start + t / (T-1) * (beta_end - beta_start)``.
    """
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17).

    ``abar(t) = f(t) / f(0)``, ``f(t) = cos(((t / T) + s) / (1 + s) * pi / 2) ** 2`` and
    ``beta_t = min(1 - abar(t+1) / abar(t), max_beta)`` for t in [0, T-1]. Returns float64 ``(timesteps,)``.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def sigmoid_betas(
    timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """Sigmoid schedule in abar (Chen 2023, arXiv:2301.10972, Algorithm 1, ``sigmoid_schedule``; lucidrains'
    ``sigmoid_beta_schedule`` with its defaults start = -3, end = 3, tau = 1).

    ``abar(t) = (sigmoid(end / tau) - sigmoid((t / T (end - start) + start) / tau)) / (sigmoid(end / tau) -
    sigmoid(start / tau))`` for t in [0, T], so abar(0) = 1 and abar(T) = 0; ``beta_t = min(1 - abar(t+1) / abar(t),
    max_beta)`` for t in [0, T-1] (the clip keeps abar_{T-1} > 0). Returns float64 ``(timesteps,)``.
    """
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    v_start, v_end = (torch.tensor(v / tau, dtype=torch.float64).sigmoid() for v in (start, end))
    abar = (v_end - ((t * (end - start) + start) / tau).sigmoid()) / (v_end - v_start)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale a schedule so that abar_{T-1} = 0 exactly (Lin et al. 2023, arXiv:2305.08891, Algorithm 1).

    ``sqrt(abar)`` is shifted so that its last value is 0 and scaled so that its first value is unchanged:
    ``s'_t = (s_t - s_{T-1}) s_0 / (s_0 - s_{T-1})`` with ``s_t = sqrt(abar_t)``; then ``abar'_t = s'_t^2``,
    ``alpha'_0 = abar'_0``, ``alpha'_t = abar'_t / abar'_{t-1}`` and ``beta' = 1 - alpha'`` (so beta'_{T-1} = 1).
    In float64; ``betas`` ``(T,)`` with T >= 2. Returns float64 ``(T,)`` in (0, 1].
    """
    sqrt_abar = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise invalid(key, value, allowed)


def _checked_betas(
    kind: str,
    timesteps: int,
    beta_start: float,
    beta_end: float,
    cosine_s: float,
    max_beta: float,
    sigmoid_start: float,
    sigmoid_end: float,
    sigmoid_tau: float,
    rescale: object,
) -> Tensor:
    """Validate the parameters of :class:`NoiseSchedule` (which holds their defaults) and return its betas."""
    _check(isinstance(rescale, bool), "rescale_zero_terminal_snr", rescale, "must be true or false")
    betas = _kind_betas(
        kind, timesteps, beta_start, beta_end, cosine_s, max_beta, sigmoid_start, sigmoid_end, sigmoid_tau
    )
    if not rescale:
        return betas
    _check(timesteps >= 2, "rescale_zero_terminal_snr", rescale, "needs timesteps >= 2")
    return rescale_zero_terminal_snr(betas)


def _kind_betas(
    kind: str,
    timesteps: int,
    beta_start: float,
    beta_end: float,
    cosine_s: float,
    max_beta: float,
    sigmoid_start: float,
    sigmoid_end: float,
    sigmoid_tau: float,
) -> Tensor:
    _check(kind in SCHEDULE_KINDS, "kind", kind, f"must be one of {list(SCHEDULE_KINDS)}")
    _check(
        is_int(timesteps) and timesteps >= 1,
        "timesteps",
        timesteps,
        "must be an integer >= 1 (write 1000, not 1e3)",
    )
    if kind == "linear":
        _check(is_number(beta_start) and 0 < beta_start < 1, "beta_start", beta_start, "must be in (0, 1)")
        _check(is_number(beta_end) and 0 < beta_end < 1, "beta_end", beta_end, "must be in (0, 1)")
        _check(beta_start <= beta_end, "beta_start", beta_start, f"must be <= beta_end={beta_end!r}")
        return linear_betas(timesteps, beta_start, beta_end)
    _check(is_number(max_beta) and 0 < max_beta < 1, "max_beta", max_beta, "must be in (0, 1)")
    if kind == "cosine":
        _check(is_number(cosine_s) and 0 < cosine_s < float("inf"), "cosine_s", cosine_s, "must be a number > 0")
        return cosine_betas(timesteps, cosine_s, max_beta)
    for key, value in (("sigmoid_start", sigmoid_start), ("sigmoid_end", sigmoid_end)):
        _check(is_number(value) and math.isfinite(value), key, value, "must be a finite number")
    _check(sigmoid_start < sigmoid_end, "sigmoid_start", sigmoid_start, f"must be < sigmoid_end={sigmoid_end!r}")
    _check(
        is_number(sigmoid_tau) and 0 < sigmoid_tau < float("inf"), "sigmoid_tau", sigmoid_tau, "must be a number > 0"
    )
    return sigmoid_betas(timesteps, sigmoid_start, sigmoid_end, sigmoid_tau, max_beta)


def make_betas(*args, **kwargs) -> Tensor:
    """Validate :class:`NoiseSchedule`'s parameters (same names, order and defaults) and return its float64
    betas of shape ``(timesteps,)`` in (0, 1).

    Raises:
        ConfigError (a ValueError): one line naming the parameter (``beta_end``, ...), its value and
            what is allowed.
    """
    return NoiseSchedule(*args, **kwargs).betas


def _derived_buffers(betas: Tensor, alphas: Tensor, alphas_cumprod: Tensor) -> dict[str, Tensor]:
    """Every :class:`NoiseSchedule` buffer from float64 ``(T,)`` betas, alphas and abar, in one place, for the
    full schedule and for respaced ones alike: Eq. 4's coefficients and the posterior of Ho et al. Eq. 7,
    ``mu~_t = coef1_t x0 + coef2_t x_t`` with ``coef1_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t)``,
    ``coef2_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)`` and
    ``beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t`` (abar_{-1} = 1)."""
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64, device=betas.device), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    log_var = torch.log(
        torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if betas.shape[0] > 1 else betas.clone()
    )
    return dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
        sqrt_recip_alphas_cumprod=alphas_cumprod.rsqrt(),
        sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=log_var,
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    )


#: The variance of the reverse step p_theta(x_{t-1} | x_t): beta~_t, beta_t, or learned (:func:`learned_log_variance`).
VARIANCES = ("fixed_small", "fixed_large", "learned")


def check_variance(variance: object, learn_sigma: bool, key: str = "variance") -> str:
    """``variance`` must be one of :data:`VARIANCES`, and ``learned`` only for a network that learns sigma.

    Raises:
        ConfigError: naming ``key``.
    """
    if variance not in VARIANCES:
        raise invalid(key, variance, f"must be one of {list(VARIANCES)}")
    if variance == "learned" and not learn_sigma:
        raise invalid(
            key, variance, "the model has no variance output (model.learn_sigma=false); use fixed_small or fixed_large"
        )
    return str(variance)


def learned_log_variance(v: Tensor, log_beta_tilde: Tensor, log_beta: Tensor) -> Tensor:
    """The learned-range variance of Nichol & Dhariwal 2021 (arXiv:2102.09672, Eq. 15):
    ``log Sigma = frac log beta_t + (1 - frac) log beta~_t`` with ``frac = (v + 1) / 2``, interpolating in the log
    domain between ``fixed_small`` (v = -1, beta~_t) and ``fixed_large`` (v = +1, beta_t). ``v`` is the network's raw
    output (not clamped, as in the paper); the three arguments broadcast. Returns the log variance."""
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def extract(coef: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Gather ``coef[t]`` for a batch of timesteps and shape it to broadcast against ``x``.

    Args:
        coef: ``(T,)`` float64 schedule buffer.
        t: ``(N,)`` int64 timesteps in [0, T-1].
        x: ``(N, ...)`` tensor whose dtype and rank the result takes.

    Returns:
        ``(N, 1, ..., 1)`` tensor of ``x.dtype`` on ``x.device``.
    """
    out = coef.to(x.device).gather(0, t.to(device=x.device, dtype=torch.long))
    return out.to(x.dtype).reshape(t.shape[0], *((1,) * (x.ndim - 1)))


class NoiseSchedule(nn.Module):
    """DDPM variance schedule and forward process, held as float64 buffers of shape ``(T,)``.

    Buffers (index t in [0, T-1]):
        ``betas``, ``alphas`` (1 - beta_t; see :meth:`respaced`), ``alphas_cumprod`` (abar_t),
        ``alphas_cumprod_prev`` (abar_{t-1}, with abar_{-1} = 1), ``sqrt_alphas_cumprod``,
        ``sqrt_one_minus_alphas_cumprod``,
        ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``,
        ``posterior_variance`` (beta-tilde_t, Ho et al. Eq. 7; 0 at t = 0),
        ``posterior_log_variance_clipped`` (log beta-tilde with the t = 0 entry replaced by t = 1),
        ``posterior_mean_coef1`` (coefficient of x0 in Eq. 7; exactly 1 at t = 0),
        ``posterior_mean_coef2`` (coefficient of x_t in Eq. 7; exactly 0 at t = 0).

    Args:
        kind: ``"linear"`` (Ho et al. 2020), ``"cosine"`` (Nichol & Dhariwal 2021) or ``"sigmoid"`` (Chen 2023,
            in abar: :func:`sigmoid_betas`).
        timesteps: T, an integer >= 1.
        beta_start, beta_end: endpoints of the linear schedule, 0 < beta_start <= beta_end < 1.
        cosine_s: offset of the cosine schedule; max_beta: the beta clip of the cosine and sigmoid schedules.
        sigmoid_start, sigmoid_end, sigmoid_tau: the sigmoid schedule's input range (start < end) and temperature.
        rescale_zero_terminal_snr: rescale the betas so that abar_{T-1} = 0 (Lin et al. 2023, Algorithm 1:
            :func:`rescale_zero_terminal_snr`); then ``sqrt_recip_alphas_cumprod`` is infinite at T-1 and only the
            ``v`` and ``x0`` objectives can be trained (:func:`~ddpm_lightning.objectives.check_objective`).

    Raises:
        ConfigError (a ValueError): one line naming the parameter (``beta_end``, ...), the value and
            what is allowed.
    """

    def __init__(
        self,
        kind: str = "linear",
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
        sigmoid_start: float = -3.0,
        sigmoid_end: float = 3.0,
        sigmoid_tau: float = 1.0,
        rescale_zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        betas = _checked_betas(
            kind,
            timesteps,
            beta_start,
            beta_end,
            cosine_s,
            max_beta,
            sigmoid_start,
            sigmoid_end,
            sigmoid_tau,
            rescale_zero_terminal_snr,
        )
        self.kind = kind
        self.config = dict(
            kind=kind,
            timesteps=timesteps,
            beta_start=float(beta_start),
            beta_end=float(beta_end),
            cosine_s=float(cosine_s),
            max_beta=float(max_beta),
            sigmoid_start=float(sigmoid_start),
            sigmoid_end=float(sigmoid_end),
            sigmoid_tau=float(sigmoid_tau),
            rescale_zero_terminal_snr=bool(rescale_zero_terminal_snr),
        )
        alphas = 1.0 - betas
        self._register(_derived_buffers(betas, alphas, torch.cumprod(alphas, dim=0)))

    def _register(self, buffers: dict[str, Tensor]) -> None:
        # Not persistent: every buffer is a function of ``config``, so checkpoints need not hold them (and a
        # zero-terminal-SNR schedule's sqrt_recip_alphas_cumprod is infinite at T-1, which no checkpoint may hold).
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Drop the copies of the buffers that checkpoints written before they became non-persistent hold: the
        schedule is rebuilt from its config, so they are redundant (and loading them would change nothing)."""
        for name in list(self._buffers):
            state_dict.pop(prefix + name, None)

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]

    def _apply(self, fn, recurse=True):
        """Move buffers across devices but never change their float64 dtype (``.half()`` etc.)."""
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def respaced(self, timesteps: Sequence[int]) -> NoiseSchedule:
        """The schedule restricted to the kept ``timesteps`` (Nichol & Dhariwal 2021, Sec. 4, "respacing").

        With the kept steps sorted ascending, ``t_0 < t_1 < ... < t_{S-1}``, index i of the result has
        ``alphas_cumprod[i] = abar_{t_i}`` (this schedule's value, unchanged) and its own step
        ``alphas[i] = abar_{t_i} / abar_{t_{i-1}}``, ``betas[i] = 1 - alphas[i]`` (abar_{t_{-1}} = 1); every
        other buffer (Eq. 4's coefficients, Eq. 7's posterior) is derived from these by the code that derives
        the full schedule's. ``alphas`` is the ratio itself, not ``1 - betas``: a ratio ~1e-15 (a long stride
        with ``beta_end = 0.2``) would lose its digits in ``1 - (1 - ratio)``.

        Args:
            timesteps: distinct 0-based timesteps in [0, T-1], in any order (the samplers pass them descending).

        Returns:
            A :class:`NoiseSchedule` of S steps on this schedule's device whose index i is ``t_i``; this
            schedule itself when ``timesteps`` are all T steps.

        Raises:
            ValueError: ``timesteps`` empty, repeated, not integers or outside [0, T-1].
        """
        kept = sorted({int(t) for t in timesteps if is_int(t)})
        T = self.num_timesteps
        if not kept or len(kept) != len(timesteps) or kept[0] < 0 or kept[-1] >= T:
            raise ValueError(f"respaced timesteps must be distinct integers in [0, {T - 1}], got {list(timesteps)!r}")
        if len(kept) == T:
            return self
        abar = self.alphas_cumprod[torch.tensor(kept, device=self.alphas_cumprod.device)]
        alphas = abar / torch.cat([torch.ones(1, dtype=torch.float64, device=abar.device), abar[:-1]])
        schedule = NoiseSchedule.__new__(NoiseSchedule)
        nn.Module.__init__(schedule)
        schedule.kind = self.kind
        schedule.config = dict(self.config, respaced_steps=len(kept))
        schedule._register(_derived_buffers(1.0 - alphas, alphas, abar))
        return schedule

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample the forward process, Ho et al. Eq. 4: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

        Args:
            x0: ``(N, C, H, W)`` clean images in [-1, 1].
            t: ``(N,)`` int64 timesteps in [0, T-1].
            noise: eps, same shape as ``x0``, standard normal.

        Returns:
            x_t with the shape and dtype of ``x0``.
        """
        return (
            extract(self.sqrt_alphas_cumprod, t, x0) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert Eq. 4 for x0: ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``.

        Shapes as in :meth:`q_sample`; returns x0 with the dtype of ``x_t`` (not clipped).
        """
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0), Ho et al. Eqs. 6-7.

        ``mean = coef1_t x0 + coef2_t x_t``, ``variance = beta-tilde_t``. At t = 0 the mean is x0 and the
        variance is 0. Returns ``(mean, variance)``, mean shaped like ``x_t``, variance ``(N, 1, 1, 1)``.
        """
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())
