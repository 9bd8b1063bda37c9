"""Training objectives beyond L_simple and the variational bound in bits/dim. No Lightning or Hydra import here.

Sources
-------
* Ho, Jain & Abbeel 2020 (arXiv:2006.11239): the bound L_vlb = L_T + sum_{t>1} L_{t-1} + L_0 (Eq. 5), the Gaussian
  KL terms between the posterior q(x_{t-1} | x_t, x0) (Eqs. 6-7) and p_theta(x_{t-1} | x_t), and the discretized
  Gaussian decoder L_0 = -log p_theta(x0 | x1) over the 256 pixel bins of width 2/255 with the outer bins extended
  to +-infinity (Sec. 3.3, Eq. 13).
* Nichol & Dhariwal 2021 (arXiv:2102.09672): learned variances ``log Sigma = v log beta_t + (1 - v) log beta~_t``
  with v = (out + 1) / 2 (Eq. 15, :func:`~ddpm_lightning.schedule.learned_log_variance`), L_hybrid = L_simple +
  lambda L_vlb with lambda = 0.001 and the mean stop-gradiented in L_vlb (Eq. 16, Sec. 3.1).

Conventions
-----------
Timesteps are 0-based (``t`` in [0, T-1] is the paper's step t+1). The term of timestep ``t``:

* ``t >= 1``: ``KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t))`` (the paper's L_{t}; 0-based x_{t-1});
* ``t == 0``: the decoder ``-log p_theta(x0 | x_1)`` (the paper's L_0);
* the prior ``L_T = KL(q(x_T | x0) || N(0, I))`` has no network and sits apart (:func:`prior_kl`).

Terms are per pixel in nats, in float64; :func:`bits_per_dim` divides by ``D ln 2``. The variance of p_theta at t = 0
(where the posterior variance is 0) is beta~_1, as in Ho et al.'s released code (``posterior_log_variance_clipped``);
``fixed_large`` uses beta_t at every t, so that a learned-range output v = +1 is exactly ``fixed_large``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ddpm_lightning.errors import invalid
from ddpm_lightning.mnist import PAD, PADDED_IMAGE_SIZE
from ddpm_lightning.objectives import predict
from ddpm_lightning.schedule import NoiseSchedule, extract, learned_log_variance

LOSSES = ("simple", "hybrid", "vlb")
PIXEL_BIN = 1.0 / 255.0  #: half the width of one of the 256 bins of [-1, 1]

ModelFn = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor | None]"]
"""``model_fn(x_t, t) -> (out, v)``: x_t ``(N, C, H, W)`` float32, t ``(N,)`` int64 in [0, T-1]; out like x_t (the
prediction of the objective: eps, x0 or v, :mod:`ddpm_lightning.objectives`) and v the raw variance output like x_t
(learned sigma) or None."""


# ------------------------------------------------------------------------------------------------ elementwise maths
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` per element in nats (broadcasting):
    ``0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1)``."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_diff_ndtr(a: Tensor, b: Tensor) -> Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b``, accurate in both tails: on the upper side it is computed as
    ``log(Phi(-a) - Phi(-b))``, and the difference as ``log Phi(hi) + log1p(-exp(log Phi(lo) - log Phi(hi)))``."""
    flip = a > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


def discretized_gaussian_log_likelihood(x0: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """``log p(x0)`` per pixel in nats of the discretized Gaussian decoder (Ho et al. 2020, Eq. 13).

    Args:
        x0: pixels on the 8-bit grid of [-1, 1] (``u / 255 * 2 - 1`` for u in 0..255), any shape.
        mean, log_variance: the Gaussian's mean and log variance, broadcastable to ``x0``.

    Returns:
        float64 like ``x0``: ``log(Phi((x0 + 1/255 - mean) / sigma) - Phi((x0 - 1/255 - mean) / sigma))``, where the
        lower limit is -infinity for x0 = -1 and the upper one +infinity for x0 = 1 (each edge bin holds the
        Gaussian's tail). The 256 probabilities of one pixel sum to 1.
    """
    x0, mean, log_variance = (v.double() for v in (x0, mean, log_variance))
    inv_sigma = torch.exp(-0.5 * log_variance)
    upper = (x0 + PIXEL_BIN - mean) * inv_sigma
    lower = (x0 - PIXEL_BIN - mean) * inv_sigma
    middle = _log_diff_ndtr(lower, upper)
    bottom = torch.special.log_ndtr(upper)  # x0 = -1: P(X < -1 + 1/255)
    top = torch.special.log_ndtr(-lower)  # x0 = 1: P(X > 1 - 1/255)
    return torch.where(x0 < -1 + PIXEL_BIN, bottom, torch.where(x0 > 1 - PIXEL_BIN, top, middle))


def bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Nats over ``num_dims`` pixels to bits per pixel: ``nats / (num_dims ln 2)``."""
    return nats / (num_dims * math.log(2.0))


# ------------------------------------------------------------------------------------------------ the terms
def model_log_variance(
    schedule: NoiseSchedule, t: Tensor, like: Tensor, variance: str, v: Tensor | None = None
) -> Tensor:
    """``log sigma_t^2`` of p_theta(x_{t-1} | x_t), float64, broadcastable to ``like`` (``(N, 1, 1, 1)`` for a fixed
    variance, like ``v`` for a learned one).

    * ``fixed_small``: log beta~_t (``posterior_log_variance_clipped``: beta~_1 at t = 0);
    * ``fixed_large``: log beta_t;
    * ``learned``: Nichol & Dhariwal Eq. 15 on the raw output ``v``
      (:func:`~ddpm_lightning.schedule.learned_log_variance`).
    """
    like = like.double()
    log_small = extract(schedule.posterior_log_variance_clipped, t, like)
    log_large = torch.log(extract(schedule.betas, t, like))
    if variance == "fixed_small":
        return log_small
    if variance == "fixed_large":
        return log_large
    if v is None:
        raise ValueError("variance='learned' needs the network's variance output v")
    return learned_log_variance(v.double(), log_small, log_large)


def predict_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, out: Tensor, objective: str = "eps") -> Tensor:
    """x0_hat from the network output ``out`` of ``objective`` at x_t (:func:`ddpm_lightning.objectives.predict`),
    float64 like ``x_t``; for eps it is ``predict_x0_from_eps``."""
    x_t = x_t.double()
    alpha, sigma = (extract(b, t, x_t) for b in (schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod))
    return predict(objective, out.double(), x_t, alpha, sigma).x0


def model_mean(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, x0_hat: Tensor, clip_denoised: bool = False) -> Tensor:
    """The mean of p_theta(x_{t-1} | x_t): the posterior mean (Eq. 7) at ``x0_hat`` (:func:`predict_x0`; clipped to
    [-1, 1] when ``clip_denoised``; unclipped, with the x0_hat of an eps prediction, it equals Eq. 11). float64 like
    ``x_t``."""
    x_t, x0_hat = x_t.double(), x0_hat.double()
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    return schedule.q_posterior_mean_variance(x0_hat, x_t, t)[0]


def vb_terms(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """The bound's term of each sample's timestep, per pixel in nats (float64, shaped like ``x0``).

    Args:
        x0: ``(N, C, H, W)`` clean images on the 8-bit grid of [-1, 1].
        x_t: ``(N, C, H, W)``, ``q_sample(x0, t, eps)``.
        t: ``(N,)`` int64 in [0, T-1].
        mean, log_variance: p_theta(x_{t-1} | x_t) (:func:`model_mean`, :func:`model_log_variance`).

    Returns:
        ``KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t))`` where ``t >= 1``; the decoder's
        ``-log p_theta(x0 | x_1)`` (:func:`discretized_gaussian_log_likelihood`) where ``t == 0``.
    """
    x0, x_t = x0.double(), x_t.double()
    true_mean, _ = schedule.q_posterior_mean_variance(x0, x_t, t)
    true_log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t)
    kl = normal_kl(true_mean, true_log_variance, mean, log_variance)
    decoder = -discretized_gaussian_log_likelihood(x0, mean, log_variance)
    return torch.where((t == 0).reshape(-1, *([1] * (x0.ndim - 1))), decoder, kl)


def prior_kl(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = ``KL(q(x_T | x0) || N(0, I))`` per pixel in nats, float64 like ``x0``; q(x_T | x0) is Eq. 4 at t = T-1."""
    x0 = x0.double()
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=torch.long, device=x0.device)
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
    log_variance = torch.log1p(-extract(schedule.alphas_cumprod, t, x0))
    return normal_kl(mean, log_variance, torch.zeros_like(x0), torch.zeros_like(x0))


# ------------------------------------------------------------------------------------------------ the bound
@dataclass
class Bound:
    """The variational bound of a batch of images, per image, in nats (float64, on the CPU).

    Every term of the bound is a sum over pixels (the Gaussians are diagonal), so it splits into the real pixels'
    share (inside the mask: the 28x28 digit) and the padding's.

    Attributes:
        prior: ``(N,)`` L_T summed over the real pixels.
        terms: ``(N, T)`` the term of every timestep t (index t; t = 0 is the decoder), summed over the real pixels.
        padding: ``(N,)`` the whole bound's share on the pixels outside the mask (the padding).
        num_dims: pixels per image (C H W, 1024).
        num_real_dims: pixels inside the mask (784 for MNIST padded to 32x32).
        variance: the variance of p_theta the terms were computed with (``fixed_small``, ``fixed_large``, ``learned``).
        seconds, forward_passes: the wall time and the network calls it took.
    """

    prior: Tensor
    terms: Tensor
    padding: Tensor
    num_dims: int
    num_real_dims: int
    variance: str = ""
    seconds: float = 0.0
    forward_passes: int = 0

    @classmethod
    def cat(cls, parts: list[Bound]) -> Bound:
        """The bounds of several batches of images (same pixels and variance) as one."""
        first = parts[0]
        return cls(
            torch.cat([b.prior for b in parts]),
            torch.cat([b.terms for b in parts]),
            torch.cat([b.padding for b in parts]),
            first.num_dims,
            first.num_real_dims,
            first.variance,
            sum(b.seconds for b in parts),
            sum(b.forward_passes for b in parts),
        )

    @property
    def total(self) -> Tensor:
        """``(N,)`` L_vlb = L_T + sum_t terms over the real pixels, nats per image."""
        return self.prior + self.terms.sum(1)

    def summary(self) -> dict[str, float | list[float]]:
        """The bound in bits/dim, averaged over the images.

        ``bpd``: over the ``num_real_dims`` real pixels (their share / 784; the padding is left out because it is
        trivially predictable and would flatter the figure); ``bpd_stderr``: its standard error over the images;
        ``bpd_all_pixels``: the whole bound / 1024. The breakdown of ``bpd``: ``prior_bpd`` (L_T), ``vb_bpd`` (the
        sum over t >= 1), ``decoder_bpd`` (L_0), ``quartile_bpd`` (the sums over t in the four quartiles of
        [0, T-1], which add up to ``vb_bpd + decoder_bpd``); ``padding_bpd``: the padding's share / 1024 (so that
        ``bpd_all_pixels = (784 bpd) / 1024 + padding_bpd``). ``n``: images."""
        d, n = self.num_real_dims, self.terms.shape[0]
        T = self.terms.shape[1]
        per_image = bits_per_dim(self.total, d)
        quartile = (torch.arange(T) * 4) // T
        return {
            "bpd": float(per_image.mean()),
            "bpd_stderr": float(per_image.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"),
            "bpd_all_pixels": float(bits_per_dim(self.total + self.padding, self.num_dims).mean()),
            "prior_bpd": float(bits_per_dim(self.prior, d).mean()),
            "vb_bpd": float(bits_per_dim(self.terms[:, 1:].sum(1), d).mean()),
            "decoder_bpd": float(bits_per_dim(self.terms[:, 0], d).mean()),
            "quartile_bpd": [float(bits_per_dim(self.terms[:, quartile == q].sum(1), d).mean()) for q in range(4)],
            "padding_bpd": float(bits_per_dim(self.padding, self.num_dims).mean()),
            "n": n,
        }


def digit_mask(padding: int = PAD, size: int = PADDED_IMAGE_SIZE) -> Tensor:
    """``(1, size, size)`` bool, True on the ``size - 2 padding`` square of real pixels (784 of MNIST's 1024)."""
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, padding : size - padding, padding : size - padding] = True
    return mask


@torch.no_grad()
def variational_bound(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    variance: str = "fixed_small",
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    progress: bool = False,
    objective: str = "eps",
) -> Bound:
    """The bound L_vlb (Ho et al. Eq. 5) of each image, one network call per timestep: for every t, a fresh
    ``x_t = q_sample(x0, t, eps)`` and the term of :func:`vb_terms` (a single-sample estimate of each term, so the
    sum is an unbiased estimate of the bound), plus the prior :func:`prior_kl`.

    Args:
        model_fn: ``(out, v) = model_fn(x_t, t)`` in eval mode (:data:`ModelFn`); x_t is passed as float32.
        schedule: the training schedule (T steps).
        x0: ``(N, C, H, W)`` images on the 8-bit grid of [-1, 1] (``images.to_model_range`` of uint8 pixels).
        variance: ``fixed_small``, ``fixed_large`` or ``learned`` (:func:`model_log_variance`).
        clip_denoised: clip x0_hat to [-1, 1] in the mean, as the samplers do.
        generator: draws every eps (on ``x0.device``); None uses the global RNG.
        mask: ``(C, H, W)`` bool, the real pixels (the 28x28 digit; :func:`digit_mask`); None = all pixels.
        progress: a tqdm bar over the timesteps.
        objective: what ``model_fn`` predicts (``eps``, ``x0`` or ``v``).

    Returns:
        :class:`Bound` (CPU float64 tensors).
    """
    start = time.perf_counter()
    x0 = x0.double()
    n, T = x0.shape[0], schedule.num_timesteps
    mask = torch.ones(x0.shape[1:], dtype=torch.bool) if mask is None else mask.to(torch.bool)
    real, pad = mask.to(x0.device), (~mask).to(x0.device)
    prior_px = prior_kl(schedule, x0)
    terms = torch.zeros(n, T, dtype=torch.float64)
    padding = prior_px[:, pad].sum(1).cpu()
    steps = range(T - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="bound", leave=False, mininterval=5.0)
    for step in steps:
        t = torch.full((n,), step, dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32).double()
        x_t = schedule.q_sample(x0, t, noise)
        out, v = model_fn(x_t.float(), t)
        mean = model_mean(schedule, x_t, t, predict_x0(schedule, x_t, t, out, objective), clip_denoised)
        log_var = model_log_variance(schedule, t, x_t, variance, v)
        px = vb_terms(schedule, x0, x_t, t, mean, log_var)
        terms[:, step] = px[:, real].sum(1).cpu()
        padding += px[:, pad].sum(1).cpu()
    return Bound(
        prior_px[:, real].sum(1).cpu(),
        terms,
        padding,
        int(mask.numel()),
        int(mask.sum()),
        variance,
        seconds=time.perf_counter() - start,
        forward_passes=n * T,
    )


# ------------------------------------------------------------------------------------------------ training losses
def check_loss(loss: object, learn_sigma: bool, min_snr_gamma: float | None) -> str:
    """``diffusion.loss`` against the network and the other options.

    Raises:
        ConfigError: naming ``loss`` (an unknown loss; ``hybrid`` without a variance output, whose stop-gradient VLB
            term would have nothing to train; ``vlb`` with ``min_snr_gamma``, a weight of the MSE it does not have).
    """
    if loss not in LOSSES:
        raise invalid("loss", loss, f"must be one of {list(LOSSES)}")
    if loss == "hybrid" and not learn_sigma:
        raise invalid(
            "loss",
            loss,
            "needs model.learn_sigma=true (with a fixed variance the VLB term, its mean "
            "stop-gradiented, trains nothing); use loss=simple or loss=vlb",
        )
    if loss == "vlb" and min_snr_gamma is not None:
        raise invalid("loss", loss, "has no MSE term for min_snr_gamma to weight; set min_snr_gamma=null")
    return str(loss)


def training_vb(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, x0_hat: Tensor, v: Tensor | None, stop_grad_mean: bool
) -> Tensor:
    """The VLB term of each sample's timestep for training, in bits per pixel (``(N,)`` float32 with gradients): the
    mean of p_theta from the network's ``x0_hat`` (:func:`predict_x0`; detached for L_hybrid, ``stop_grad_mean``: only
    the variance learns from it, Nichol & Dhariwal Sec. 3.1), the variance learned from ``v`` (or ``fixed_small`` when
    ``v`` is None), in float64. ``T * training_vb`` is an unbiased one-sample estimate of L_vlb - L_T in bits/dim."""
    mean = model_mean(schedule, x_t, t, x0_hat.detach() if stop_grad_mean else x0_hat)
    log_var = model_log_variance(schedule, t, x_t, "learned" if v is not None else "fixed_small", v)
    px = vb_terms(schedule, x0, x_t, t, mean, log_var)
    return bits_per_dim(px.flatten(1).sum(1), px[0].numel()).float()
