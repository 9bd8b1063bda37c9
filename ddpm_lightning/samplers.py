"""Reverse processes (samplers) over any noise-prediction function ``eps = eps_fn(x_t, t)``.

* :class:`DDPMSampler`: ancestral sampling, Ho et al. 2020 (arXiv:2006.11239) Algorithm 2 with
  ``x_{t-1} = mu(x_t, t) + sigma_t z`` and no noise at the last step. ``variance="fixed_small"`` uses the
  posterior variance beta-tilde_t (Eq. 7), ``"fixed_large"`` uses beta_t (both Sec. 3.2), ``"learned"`` the network's
  variance output (Nichol & Dhariwal 2021, arXiv:2102.09672, Eq. 15, on the visited steps' betas). Optional striding to
  fewer steps samples the respaced schedule, ``beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}``
  (Nichol & Dhariwal 2021, arXiv:2102.09672, Sec. 4; :meth:`NoiseSchedule.respaced`).
* :class:`DDIMSampler`: Song, Meng & Ermon 2021 (arXiv:2010.02502) Eq. 12 with
  ``sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)`` (Eq. 16);
  eta = 0 is deterministic, eta = 1 with every step is DDPM with ``fixed_small``.

Both walk a descending list of 0-based timesteps and finish at abar = 1 (the clean image). Every per-step
coefficient is read from the float64 buffers of the schedule respaced to the visited steps (the full schedule
itself when every step is visited), so the numbers that sample are the ones the schedule's golden tests pin;
they are applied as Python floats, so a schedule whose abar underflows float32 (beta_end = 0.2) still samples
with finite values. No Lightning or Hydra import here.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ddpm_lightning.errors import invalid, is_int, is_number
from ddpm_lightning.schedule import VARIANCES, NoiseSchedule, check_variance, learned_log_variance

EpsFn = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, Tensor | None]"]
"""``eps_fn(x_t, t) -> eps`` or ``(eps, v)``: x_t ``(N, C, H, W)``, t ``(N,)`` int64 in [0, T-1], eps shaped like x_t,
v the raw variance output of a learned-sigma network (shaped like x_t) or None."""

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class SampleOutput(NamedTuple):
    """Result of a reverse process.

    Attributes:
        x0: ``(N, C, H, W)`` final samples, clamped to [-1, 1].
        trajectory: list of ``(t, x_t)`` pairs (x_t on the CPU, float32), recorded when asked, from
            pure noise (t = first timestep) to the final sample (t = -1 denotes x0).
    """

    x0: Tensor
    trajectory: list[tuple[int, Tensor]]


def _check_steps(steps: object, num_timesteps: int | None) -> int:
    """``steps`` must be an integer in [1, T] (or >= 1 while T is not known yet)."""
    if not is_int(steps) or steps < 1:
        raise invalid("steps", steps, "must be a positive integer")
    if num_timesteps is not None and steps > num_timesteps:
        raise invalid("steps", steps, f"must be an integer in [1, {num_timesteps}] (the schedule's timesteps)")
    return steps


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """Descending timesteps visited by DDIM, as diffusers defines the three spacings.

    For T = 1000, S = 50: ``leading`` = [980, 960, ..., 0] (``arange(S) * (T // S)``), ``trailing`` =
    [999, 979, ..., 19] (``round(T - i * T / S) - 1``), ``linspace`` = [999, 979, 958, ..., 20, 0]
    (``round(linspace(0, T - 1, S))``). Returns S distinct int timesteps in [0, T-1].

    Raises:
        ConfigError (a ValueError): ``steps`` not an integer in [1, T], or an unknown ``timestep_spacing``.
    """
    _check_steps(steps, num_timesteps)
    if spacing == "leading":
        ts = np.arange(steps) * (num_timesteps // steps)
    elif spacing == "trailing":
        # linspace, not arange with a float step: arange can return S+1 values (a spurious -1)
        ts = np.round(np.linspace(num_timesteps, 0, steps, endpoint=False)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    else:
        raise invalid("timestep_spacing", spacing, f"must be one of {list(TIMESTEP_SPACINGS)}")
    return sorted({int(t) for t in ts}, reverse=True)


def strided_timesteps(num_timesteps: int, steps: int | None) -> list[int]:
    """Descending timesteps kept by a respaced DDPM: all T when ``steps`` is None or T, otherwise S evenly
    spaced steps ``round(linspace(0, T - 1, S))`` that always include T-1 (pure noise) and 0.

    Raises:
        ConfigError (a ValueError): ``steps`` not an integer in [1, T].
    """
    if steps is None or steps == num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    _check_steps(steps, num_timesteps)
    if steps == 1:
        return [num_timesteps - 1]
    return sorted({int(t) for t in np.round(np.linspace(0, num_timesteps - 1, steps))}, reverse=True)


def _per_step(schedule: NoiseSchedule, timesteps: list[int]) -> list[tuple[int, dict[str, float]]]:
    """``(t, coefficients)`` for each visited step, in the order given (descending): the float64 values of the
    buffers of ``schedule.respaced(timesteps)`` at t's index, read to the CPU once."""
    respaced = schedule.respaced(timesteps)
    columns = {name: buf.detach().to("cpu", torch.float64).tolist() for name, buf in respaced.named_buffers()}
    index = {t: i for i, t in enumerate(sorted(timesteps))}
    return [(t, {name: values[index[t]] for name, values in columns.items()}) for t in timesteps]


class Sampler:
    """A reverse process: start from ``noise`` (x_T), step through :meth:`timesteps`, record the trajectory.

    Subclasses define :meth:`timesteps`, ``_needs_noise`` and ``_step``; each step gets ``c``, the float64
    buffers of the respaced schedule at that step (``c["alphas_cumprod"]`` is abar_t, ``c["alphas_cumprod_prev"]``
    the abar of the next visited step, 1 after the last).
    """

    clip_denoised: bool
    steps: int | None

    def timesteps(self, num_timesteps: int) -> list[int]:  # pragma: no cover - abstract
        """The descending 0-based timesteps this sampler visits on a schedule of ``num_timesteps`` steps."""
        raise NotImplementedError

    def check(self, num_timesteps: int, learn_sigma: bool = False) -> None:
        """Raise the ConfigError naming ``steps`` when this sampler does not fit a schedule of ``num_timesteps``
        steps (``steps`` above T), or ``variance`` when it asks for a learned variance that the network
        (``learn_sigma``) does not output; for checking a configuration before any work starts.

        Raises:
            ConfigError (a ValueError): e.g. ``steps=2000 is invalid: must be an integer in [1, 1000] (...)``.
        """
        if self.steps is not None:
            _check_steps(self.steps, num_timesteps)
        if getattr(self, "variance", None) is not None:
            check_variance(self.variance, learn_sigma)

    def _step(self, x: Tensor, eps: Tensor, c: dict[str, float], z: Tensor | None, v: Tensor | None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _needs_noise(self, c: dict[str, float]) -> bool:
        raise NotImplementedError  # pragma: no cover - abstract

    @torch.inference_mode()
    def __call__(
        self,
        eps_fn: EpsFn,
        schedule: NoiseSchedule,
        noise: Tensor,
        generator: torch.Generator | None = None,
        trajectory_every: int | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        """Run the reverse process from ``noise``.

        Args:
            eps_fn: the noise predictor, ``eps_fn(x_t, t)``; called in the caller's mode (use eval mode).
            schedule: the training schedule (T steps).
            noise: x_T, ``(N, C, H, W)`` standard normal; its device and dtype are used throughout.
            generator: draws the per-step noise z (``torch.randn`` on ``noise.device``); None uses the global RNG.
            trajectory_every: record x_t every this many sampler steps (and the start and end); None records none.
            progress: show a tqdm bar over the steps.

        Returns:
            :class:`SampleOutput` with x0 in [-1, 1].
        """
        if trajectory_every is not None and (not isinstance(trajectory_every, int) or trajectory_every < 1):
            raise invalid("trajectory_every", trajectory_every, "must be a positive integer or null")
        steps = _per_step(schedule, self.timesteps(schedule.num_timesteps))
        x = noise
        trajectory: list[tuple[int, Tensor]] = []
        if trajectory_every is not None:
            trajectory.append((steps[0][0], x.detach().float().cpu()))
        iterator = steps
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(steps, desc=type(self).__name__, leave=False)
        for i, (t, c) in enumerate(iterator):
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            out = eps_fn(x, t_batch)
            eps, v = out if isinstance(out, tuple) else (out, None)
            eps, v = eps.to(x.dtype), (v.to(x.dtype) if v is not None else None)
            z = None
            if self._needs_noise(c):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self._step(x, eps, c, z, v)
            last = i + 1 == len(steps)
            if trajectory_every is not None and ((i + 1) % trajectory_every == 0 or last):
                trajectory.append((steps[i + 1][0] if not last else -1, x.detach().float().cpu()))
        return SampleOutput(x.clamp(-1.0, 1.0), trajectory)

    def _predict_x0(self, x: Tensor, eps: Tensor, c: dict[str, float]) -> Tensor:
        """Eq. 4 inverted, as :meth:`NoiseSchedule.predict_x0_from_eps`: ``x0 = x_t / sqrt(abar_t) -
        sqrt(1 / abar_t - 1) eps``, clipped to [-1, 1] when ``clip_denoised``."""
        x0 = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0




class DDPMSampler(Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), optionally respaced to fewer steps.

    Args:
        variance: ``"fixed_small"`` (sigma_t^2 = beta-tilde_t, Eq. 7), ``"fixed_large"`` (sigma_t^2 = beta_t) or
            ``"learned"``: ``log sigma_t^2 = frac log beta_t + (1 - frac) log beta-tilde_t``, ``frac = (v + 1) / 2``, from
            the network's variance output v (Nichol & Dhariwal 2021, Eq. 15), per pixel; respaced, beta_t and
            beta-tilde_t are the respaced schedule's (the kept steps' betas recomputed, Sec. 4).
        clip_denoised: clip the predicted x0 to [-1, 1] and use the posterior mean of Eq. 7 (the paper's
            released code does); False uses Algorithm 2's mean (Eq. 11)
            ``(x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)``.
        steps: None (all T steps) or S in [1, T] evenly strided steps, sampled with the respaced schedule's
            betas (:meth:`NoiseSchedule.respaced`).

    Every coefficient (``betas``, ``alphas``, ``posterior_mean_coef1/2``, ``posterior_variance``, ...) is the
    (respaced) schedule's buffer.

    Raises:
        ConfigError (a ValueError): one line naming ``variance`` or ``steps`` and the allowed values.
    """

    def __init__(self, variance: str = "fixed_small", clip_denoised: bool = True, steps: int | None = None):
        if variance not in VARIANCES:
            raise invalid("variance", variance, f"must be one of {list(VARIANCES)}")
        if steps is not None:
            _check_steps(steps, None)
        self.variance = variance
        self.clip_denoised = bool(clip_denoised)
        self.steps = steps

    def timesteps(self, num_timesteps: int) -> list[int]:
        return strided_timesteps(num_timesteps, self.steps)

    def _needs_noise(self, c: dict[str, float]) -> bool:
        return c["alphas_cumprod_prev"] < 1.0  # not the last step (abar_{-1} = 1)

    def _step(self, x: Tensor, eps: Tensor, c: dict[str, float], z: Tensor | None, v: Tensor | None) -> Tensor:
        if self.clip_denoised:  # Eq. 7: mu~_t(x_t, x0_hat) = coef1_t x0_hat + coef2_t x_t
            mean = c["posterior_mean_coef1"] * self._predict_x0(x, eps, c) + c["posterior_mean_coef2"] * x
        else:  # Eq. 11: mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
            mean = (x - c["betas"] / c["sqrt_one_minus_alphas_cumprod"] * eps) / math.sqrt(c["alphas"])
        if z is None:
            return mean
        if self.variance == "learned":
            if v is None:
                raise ValueError("variance='learned' needs a network with a variance output (model.learn_sigma=true)")
            log_var = learned_log_variance(v, c["posterior_log_variance_clipped"], math.log(c["betas"]))
            return mean + torch.exp(0.5 * log_var) * z
        var = c["posterior_variance"] if self.variance == "fixed_small" else c["betas"]
        return mean + math.sqrt(var) * z

    def __repr__(self) -> str:
        return f"DDPMSampler(variance={self.variance!r}, clip_denoised={self.clip_denoised}, steps={self.steps})"


class DDIMSampler(Sampler):
    """DDIM sampling (Song et al. 2021, Eq. 12) over S of the T training steps.

    abar_t and abar_prev are the schedule's ``alphas_cumprod`` at this step and the next visited one (1 after
    the last). Eq. 16's ``sigma_t(eta)^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)`` is
    ``eta^2`` times the respaced schedule's ``posterior_variance`` (beta-tilde of Eq. 7 with
    ``beta = 1 - abar_t / abar_prev``), which is why eta = 1 over all steps is DDPM ``fixed_small``.

    Args:
        steps: S, an integer in [1, T].
        eta: >= 0; 0 is deterministic given x_T, 1 with S = T equals DDPM ``fixed_small``.
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"`` (see :func:`ddim_timesteps`).
        clip_denoised: clip the predicted x0 to [-1, 1] and re-derive eps from the clipped x0.

    Raises:
        ConfigError (a ValueError): one line naming ``steps``, ``eta`` or ``timestep_spacing``.
    """

    def __init__(
        self,
        steps: int = 50,
        eta: float = 0.0,
        timestep_spacing: str = "leading",
        clip_denoised: bool = True,
    ):
        _check_steps(steps, None)
        if not is_number(eta) or not eta >= 0 or math.isinf(eta):
            raise invalid("eta", eta, "must be a finite number >= 0")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise invalid("timestep_spacing", timestep_spacing, f"must be one of {list(TIMESTEP_SPACINGS)}")
        self.steps = steps
        self.eta = float(eta)
        self.timestep_spacing = timestep_spacing
        self.clip_denoised = bool(clip_denoised)

    def timesteps(self, num_timesteps: int) -> list[int]:
        return ddim_timesteps(num_timesteps, self.steps, self.timestep_spacing)

    def _needs_noise(self, c: dict[str, float]) -> bool:
        return self.eta > 0 and c["alphas_cumprod_prev"] < 1.0

    def _step(self, x: Tensor, eps: Tensor, c: dict[str, float], z: Tensor | None, v: Tensor | None) -> Tensor:
        abar_prev = c["alphas_cumprod_prev"]
        x0 = self._predict_x0(x, eps, c)
        if self.clip_denoised:  # the eps that the clipped x0 implies (Eq. 4)
            eps = (x - c["sqrt_alphas_cumprod"] * x0) / c["sqrt_one_minus_alphas_cumprod"]
        sigma = self.eta * math.sqrt(c["posterior_variance"])  # Eq. 16
        # Eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
        return x_prev if z is None else x_prev + sigma * z

    def __repr__(self) -> str:
        return (
            f"DDIMSampler(steps={self.steps}, eta={self.eta}, timestep_spacing={self.timestep_spacing!r}, "
            f"clip_denoised={self.clip_denoised})"
        )
