"""What the network predicts (the objective): the noise ``eps``, the clean image ``x0``, or the velocity ``v``, and the
one conversion between ``(x_t, network output)`` and ``(x0_hat, eps_hat)`` that training, every sampler and the
bound use.

With ``alpha_t = sqrt(abar_t)`` and ``sigma_t = sqrt(1 - abar_t)``, so that ``x_t = alpha_t x0 + sigma_t eps``
(Ho et al. 2020, arXiv:2006.11239, Eq. 4):

* ``eps``: the network predicts eps (Ho et al. Eq. 14); ``x0_hat = (x_t - sigma_t eps_hat) / alpha_t``, undefined
  where abar_t = 0 (a zero-terminal-SNR schedule at t = T-1).
* ``x0``: the network predicts x0 (Ho et al. Sec. 3.2's "predicting x0" ablation; Nichol & Dhariwal 2021,
  arXiv:2102.09672, Sec. 2); ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t`` (sigma_t > 0 at every t >= 0).
* ``v``: the velocity ``v = alpha_t eps - sigma_t x0`` (Salimans & Ho 2022, "Progressive Distillation",
  arXiv:2202.00512, Sec. 4 and Appendix D); ``x0_hat = alpha_t x_t - sigma_t v_hat``,
  ``eps_hat = sigma_t x_t + alpha_t v_hat``, defined at every t, including abar_t = 0 (Lin et al. 2023,
  arXiv:2305.08891, Sec. 3.2).

The Min-SNR-gamma weight of each objective's MSE (Hang et al. 2023, arXiv:2303.09556, Sec. 3.4 and Eq. 8-10), with
``SNR_t = abar_t / (1 - abar_t)``: eps ``min(SNR_t, gamma) / SNR_t``, x0 ``min(SNR_t, gamma)``, v
``min(SNR_t, gamma) / (SNR_t + 1)``; all three put the same weight ``min(SNR_t, gamma)`` on the x0-MSE.

No Lightning or Hydra import here.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ddpm_lightning.errors import invalid

OBJECTIVES = ("eps", "x0", "v")


class Prediction(NamedTuple):
    """The network's prediction at ``(x_t, t)`` in both forms: ``x0`` (x0_hat, not clipped) and ``eps`` (eps_hat), each
    shaped like x_t."""

    x0: Tensor
    eps: Tensor


def check_objective(objective: object, zero_terminal_snr: bool = False, key: str = "objective") -> str:
    """``objective`` must be one of :data:`OBJECTIVES`; ``eps`` is refused on a schedule with abar_{T-1} = 0, where
    x0_hat = (x_t - eps_hat) / 0 is undefined.

    Raises:
        ConfigError: naming ``key``.
    """
    if objective not in OBJECTIVES:
        raise invalid(key, objective, f"must be one of {list(OBJECTIVES)}")
    if objective == "eps" and zero_terminal_snr:
        raise invalid(
            key,
            objective,
            "schedule.rescale_zero_terminal_snr=true needs objective=v (Lin et al. 2023) or "
            "x0: with eps, x0_hat is undefined at t = T-1 where abar = 0",
        )
    return str(objective)


def target(objective: str, x0: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """What the network is trained to output for ``x_t = alpha x0 + sigma eps``: eps, x0, or
    ``v = alpha eps - sigma x0``.

    Args:
        objective: one of :data:`OBJECTIVES`.
        x0, eps: ``(N, C, H, W)``; alpha, sigma: ``sqrt(abar_t)`` and ``sqrt(1 - abar_t)`` broadcastable to them.
    """
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    return alpha * eps - sigma * x0


def predict(objective: str, output: Tensor, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Prediction:
    """The network ``output`` at x_t as :class:`Prediction` ``(x0_hat, eps_hat)`` (module docstring's formulas).

    Args:
        objective: one of :data:`OBJECTIVES`.
        output, x_t: ``(N, C, H, W)``; alpha, sigma: ``sqrt(abar_t)``, ``sqrt(1 - abar_t)`` (floats or tensors
            broadcastable to x_t; ``extract`` of the schedule's ``sqrt_alphas_cumprod`` and
            ``sqrt_one_minus_alphas_cumprod``).
    """
    if objective == "eps":
        return Prediction((x_t - sigma * output) / alpha, output)
    if objective == "x0":
        return Prediction(output, (x_t - alpha * output) / sigma)
    return Prediction(alpha * x_t - sigma * output, sigma * x_t + alpha * output)


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """Eq. 4 solved for eps: ``(x_t - alpha x0) / sigma`` (e.g. the eps that a clipped x0_hat implies)."""
    return (x_t - alpha * x0) / sigma


def min_snr_weights(objective: str, alphas_cumprod: Tensor, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma weights of ``objective``'s MSE (Hang et al. 2023, Sec. 3.4), computed in float64.

    Args:
        objective: one of :data:`OBJECTIVES`.
        alphas_cumprod: ``(T,)`` float64 abar_t.
        t: ``(N,)`` int64 timesteps in [0, T-1].
        gamma: the clamp, > 0 (5 in the paper).

    Returns:
        ``(N,)`` float32 weights on ``t``'s device: eps ``min(SNR, gamma) / SNR`` in (0, 1]; x0 ``min(SNR, gamma)`` in
        [0, gamma]; v ``min(SNR, gamma) / (SNR + 1)`` in [0, 1). SNR = 0 (abar = 0) gives 0 for x0 and v.
    """
    abar = alphas_cumprod.to(t.device)[t]
    snr = abar / (1.0 - abar)
    clamped = snr.clamp(max=gamma)
    if objective == "eps":
        weights = clamped / snr
    elif objective == "x0":
        weights = clamped
    else:
        weights = clamped / (snr + 1.0)
    return weights.float()


def zero_terminal_snr(alphas_cumprod: Tensor) -> bool:
    """Whether a schedule's last abar is exactly 0 (:func:`~ddpm_lightning.schedule.rescale_zero_terminal_snr`)."""
    return bool(alphas_cumprod[-1] == 0)
