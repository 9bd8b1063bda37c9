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

* :class:`DPMSolverSampler`: DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2, the multistep
  second-order solver in data prediction, with the midpoint form of diffusers' ``DPMSolverMultistepScheduler``), and
  its SDE form SDE-DPM-Solver++(2M) (diffusers' ``algorithm_type="sde-dpmsolver++"``), on that scheduler's own
  timestep spacings (:func:`dpm_solver_timesteps`); DDIM and respaced DDPM keep ``DDIMScheduler``'s
  (:func:`ddim_timesteps`, :func:`strided_timesteps`).

All three walk a descending list of 0-based timesteps and finish at abar = 1 (the clean image). Every per-step
coefficient is read from the float64 buffers of the schedule respaced to the visited steps (the full schedule
itself when every step is visited), so the numbers that sample are the ones the schedule's golden tests pin;
they are applied as Python floats, so a schedule whose abar underflows float32 (beta_end = 0.2) still samples
with finite values.

The network output ``eps_fn(x_t, t)`` is the prediction of the ``objective`` (``eps``, ``x0`` or ``v``) that the caller
passes; it is turned into ``(x0_hat, eps_hat)`` by :func:`ddpm_lightning.objectives.predict`, the one conversion that
training uses too, so the samplers work on a zero-terminal-SNR schedule (abar = 0 at the first step) with ``v`` or
``x0``. No Lightning or Hydra import here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ddpm_lightning.errors import invalid, is_int, is_number
from ddpm_lightning.objectives import Prediction, check_objective, eps_from_x0, predict
from ddpm_lightning.schedule import VARIANCES, NoiseSchedule, check_variance, learned_log_variance

EpsFn = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, Tensor | None]"]
"""``eps_fn(x_t, t) -> out`` or ``(out, v)``: x_t ``(N, C, H, W)``, t ``(N,)`` int64 in [0, T-1], out shaped like x_t
(the prediction of the sampler call's ``objective``: eps by default), v the raw variance output of a learned-sigma
network (shaped like x_t) or None."""

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


def _check_spacing(spacing: object) -> None:
    """``timestep_spacing`` must be one of :data:`TIMESTEP_SPACINGS`."""
    if spacing not in TIMESTEP_SPACINGS:
        raise invalid("timestep_spacing", spacing, f"must be one of {list(TIMESTEP_SPACINGS)}")


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
        _check_spacing(spacing)
    return sorted({int(t) for t in ts}, reverse=True)


def dpm_solver_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Descending timesteps visited by DPM-Solver++, as diffusers' ``DPMSolverMultistepScheduler.set_timesteps``
    defines the three spacings (diffusers 0.42, its defaults ``lambda_min_clipped=-inf`` and ``steps_offset=0``).

    Unlike DDIM's (:func:`ddim_timesteps`), ``linspace`` and ``leading`` space S + 1 points and drop the last one
    (t = 0): the solver's final step goes from the last visited timestep to sigma = 0 (the clean image), so no network
    evaluation is spent at t = 0. For T = 1000, S = 20:

    * ``linspace``: ``round(linspace(0, T - 1, S + 1))`` reversed, without its last point: [999, 949, ..., 100, 50];
    * ``leading``: ``arange(S + 1) * (T // (S + 1))`` reversed, without its last point: [940, 893, 846, ..., 94, 47];
    * ``trailing``: ``round(arange(T, 0, -T / S)) - 1``: [999, 949, ..., 99, 49] (the same list as DDIM's, except where
      a value of ``T - i T / S`` lies on a half and the float steps of ``arange`` round it the other way).

    Where ``arange`` with its float step returns one value too many (S = 61, 103, ... for T = 1000), diffusers visits a
    spurious t = -1 last; that value is dropped here, so exactly S timesteps are returned, all in [0, T-1].

    Returns:
        S distinct int timesteps in [0, T-1], descending.

    Raises:
        ConfigError (a ValueError): ``steps`` not an integer in [1, T] (in [1, T - 1] for ``linspace`` and ``leading``,
            which space S + 1 points over the T timesteps), or an unknown ``timestep_spacing``.
    """
    _check_steps(steps, num_timesteps)
    if spacing == "trailing":
        ts = np.arange(num_timesteps, 0, -num_timesteps / steps).round()[:steps].astype(np.int64) - 1
    elif spacing in ("linspace", "leading"):
        if steps > num_timesteps - 1:
            raise invalid(
                "steps",
                steps,
                f"must be an integer in [1, {num_timesteps - 1}] with timestep_spacing="
                f"{spacing!r}, which spaces steps + 1 points over the schedule's {num_timesteps} timesteps "
                f"(timestep_spacing='trailing' takes up to {num_timesteps})",
            )
        if spacing == "linspace":
            ts = np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        else:
            ts = (np.arange(0, steps + 1) * (num_timesteps // (steps + 1)))[::-1][:-1]
    else:
        _check_spacing(spacing)
    return [int(t) for t in ts]


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

    Subclasses define :meth:`timesteps`, ``_needs_noise`` and ``_step``; each step gets the prediction
    ``(x0_hat, eps_hat)`` (x0_hat clipped to [-1, 1] and eps_hat re-derived from it when ``clip_denoised``), ``c``, the
    float64 buffers of the respaced schedule at that step (``c["alphas_cumprod"]`` is abar_t,
    ``c["alphas_cumprod_prev"]`` the abar of the next visited step, 1 after the last), and ``state``, a dict that lives
    for one call (a multistep solver's history).
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

    def _step(
        self, x: Tensor, pred: Prediction, c: dict[str, float], z: Tensor | None, v: Tensor | None, state: dict
    ) -> Tensor:
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
        objective: str = "eps",
    ) -> SampleOutput:
        """Run the reverse process from ``noise``.

        Args:
            eps_fn: the network, ``eps_fn(x_t, t)`` (:data:`EpsFn`); called in the caller's mode (use eval mode).
            schedule: the training schedule (T steps).
            noise: x_T, ``(N, C, H, W)`` standard normal; its device and dtype are used throughout.
            generator: draws the per-step noise z (``torch.randn`` on ``noise.device``); None uses the global RNG.
            trajectory_every: record x_t every this many sampler steps (and the start and end); None records none.
            progress: show a tqdm bar over the steps.
            objective: what ``eps_fn`` predicts: ``eps``, ``x0`` or ``v`` (:mod:`ddpm_lightning.objectives`).

        Returns:
            :class:`SampleOutput` with x0 in [-1, 1].

        Raises:
            ConfigError: naming ``trajectory_every`` or ``objective``.
        """
        check_objective(objective)
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
        state: dict = {}
        for i, (t, c) in enumerate(iterator):
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            out = eps_fn(x, t_batch)
            out, v = out if isinstance(out, tuple) else (out, None)
            out, v = out.to(x.dtype), (v.to(x.dtype) if v is not None else None)
            z = None
            if self._needs_noise(c):
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self._step(x, self._predict(objective, out, x, c), c, z, v, state)
            last = i + 1 == len(steps)
            if trajectory_every is not None and ((i + 1) % trajectory_every == 0 or last):
                trajectory.append((steps[i + 1][0] if not last else -1, x.detach().float().cpu()))
        return SampleOutput(x.clamp(-1.0, 1.0), trajectory)

    def _predict(self, objective: str, out: Tensor, x: Tensor, c: dict[str, float]) -> Prediction:
        """``(x0_hat, eps_hat)`` from the network output (:func:`~ddpm_lightning.objectives.predict`; for eps, Eq. 4
        inverted: ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``). With ``clip_denoised`` x0_hat is clipped to
        [-1, 1] and eps_hat is the eps that the clipped x0_hat implies (Eq. 4)."""
        alpha, sigma = c["sqrt_alphas_cumprod"], c["sqrt_one_minus_alphas_cumprod"]
        pred = predict(objective, out, x, alpha, sigma)
        if not self.clip_denoised:
            return pred
        x0 = pred.x0.clamp(-1.0, 1.0)
        return Prediction(x0, eps_from_x0(x, x0, alpha, sigma))


class DDPMSampler(Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), optionally respaced to fewer steps.

    Args:
        variance: ``"fixed_small"`` (sigma_t^2 = beta-tilde_t, Eq. 7), ``"fixed_large"`` (sigma_t^2 = beta_t) or
            ``"learned"``: ``log sigma_t^2 = frac log beta_t + (1 - frac) log beta-tilde_t``, ``frac = (v + 1) / 2``,
            from the network's variance output v (Nichol & Dhariwal 2021, Eq. 15), per pixel; respaced, beta_t and
            beta-tilde_t are the respaced schedule's (the kept steps' betas recomputed, Sec. 4).
        clip_denoised: clip the predicted x0 to [-1, 1] before the posterior mean of Eq. 7 (the paper's released code
            does); False uses the unclipped x0_hat, where the mean equals Algorithm 2's (Eq. 11)
            ``(x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)`` (and stays defined where alpha_t = 0).
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

    def _step(
        self, x: Tensor, pred: Prediction, c: dict[str, float], z: Tensor | None, v: Tensor | None, state: dict
    ) -> Tensor:
        # Eq. 7: mu~_t(x_t, x0_hat) = coef1_t x0_hat + coef2_t x_t (= Eq. 11 for the unclipped x0_hat of eps)
        mean = c["posterior_mean_coef1"] * pred.x0 + c["posterior_mean_coef2"] * x
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

    On a zero-terminal-SNR schedule use ``timestep_spacing="trailing"`` (or ``linspace``), which starts at t = T-1
    (Lin et al. 2023, Sec. 3.3): ``leading`` never visits T-1 and so starts from pure noise at a t where abar > 0.

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
        _check_spacing(timestep_spacing)
        self.steps = steps
        self.eta = float(eta)
        self.timestep_spacing = timestep_spacing
        self.clip_denoised = bool(clip_denoised)

    def timesteps(self, num_timesteps: int) -> list[int]:
        return ddim_timesteps(num_timesteps, self.steps, self.timestep_spacing)

    def _needs_noise(self, c: dict[str, float]) -> bool:
        return self.eta > 0 and c["alphas_cumprod_prev"] < 1.0

    def _step(
        self, x: Tensor, pred: Prediction, c: dict[str, float], z: Tensor | None, v: Tensor | None, state: dict
    ) -> Tensor:
        abar_prev = c["alphas_cumprod_prev"]
        x0, eps = pred  # with clip_denoised: x0 clipped, eps the one it implies (Eq. 4)
        sigma = self.eta * math.sqrt(c["posterior_variance"])  # Eq. 16
        # Eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
        return x_prev if z is None else x_prev + sigma * z

    def __repr__(self) -> str:
        return (
            f"DDIMSampler(steps={self.steps}, eta={self.eta}, timestep_spacing={self.timestep_spacing!r}, "
            f"clip_denoised={self.clip_denoised})"
        )


DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")  #: diffusers' names: the ODE and the SDE form


def _log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2 of a VP schedule: -inf at abar = 0, +inf at abar = 1."""
    if abar <= 0.0:
        return -math.inf
    if abar >= 1.0:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) in data prediction, over S of the T steps.

    With ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``lambda = log(alpha / sigma)`` and ``h = lambda_next -
    lambda_t``, a step from the visited timestep t to the next one (abar = 1, the clean image, after the last) is

    * first order (DDIM with eta = 0): ``x_next = (sigma_next / sigma_t) x_t - alpha_next (exp(-h) - 1) x0_hat_t``;
    * second order (multistep, from the previous step's x0_hat): ``D = x0_hat_t + (x0_hat_t - x0_hat_prev) / (2 r)``
      with ``r = h_prev / h`` in place of x0_hat_t: the midpoint form of diffusers' ``DPMSolverMultistepScheduler``
      (``solver_type="midpoint"``) and k-diffusion's ``sample_dpmpp_2m``.

    ``algorithm="sde-dpmsolver++"`` solves the reverse SDE instead with the same data-prediction exponential integrator
    (diffusers' ``sde-dpmsolver++``, k-diffusion's ``sample_dpmpp_2m_sde``):
    ``x_next = (sigma_next / sigma_t) exp(-h) x_t + alpha_next (1 - exp(-2h)) D + sigma_next sqrt(1 - exp(-2h)) z`` with
    fresh noise z at every step but the last, D as above (order 1: x0_hat_t).

    The first step is first order (no history). The last step, into abar = 1 (sigma = 0, h = infinity), is first order
    as well and returns x0_hat of the last visited step. This is what diffusers does with its defaults: with
    ``final_sigmas_type="zero"`` its step is first order at the last timestep whatever ``lower_order_final`` (default
    True, which alone lowers the order only below 15 steps) and ``euler_at_final`` (default False) say; its
    ``final_sigmas_type="sigma_min"`` (a last step to the sigma of t = 0, then no clean-image step) is not offered
    here. One network evaluation per step, at the timesteps of :func:`dpm_solver_timesteps` (diffusers' spacings for
    this scheduler, which never spend an evaluation at t = 0 with ``linspace`` or ``leading``); ``dpmsolver++`` is
    deterministic given x_T.

    Args:
        steps: S, an integer in [1, T] (in [1, T - 1] with ``linspace`` and ``leading``).
        order: 1 (DPM-Solver++(1), which is DDIM eta = 0 in closed form) or 2 (DPM-Solver++(2M)).
        algorithm: ``"dpmsolver++"`` (the probability-flow ODE) or ``"sde-dpmsolver++"`` (the reverse SDE).
        timestep_spacing: ``"trailing"`` (default: starts at T-1, as a zero-terminal-SNR schedule needs),
            ``"leading"`` or ``"linspace"``, as diffusers' ``DPMSolverMultistepScheduler`` defines them
            (:func:`dpm_solver_timesteps`; not DDIM's :func:`ddim_timesteps`).
        clip_denoised: clip every x0_hat to [-1, 1] (the static thresholding of Lu et al. Sec. 4.2) before it enters
            the update. diffusers' default (``thresholding=False``) is ``clip_denoised=False``.

    Raises:
        ConfigError (a ValueError): one line naming ``steps``, ``order``, ``algorithm`` or ``timestep_spacing``.
    """

    def __init__(
        self,
        steps: int = 20,
        order: int = 2,
        timestep_spacing: str = "trailing",
        clip_denoised: bool = True,
        algorithm: str = "dpmsolver++",
    ):
        _check_steps(steps, None)
        if not is_int(order) or order not in (1, 2):
            raise invalid("order", order, "must be 1 or 2 (DPM-Solver++(2M) is order 2)")
        if algorithm not in DPM_ALGORITHMS:
            raise invalid("algorithm", algorithm, f"must be one of {list(DPM_ALGORITHMS)}")
        _check_spacing(timestep_spacing)
        self.algorithm = algorithm
        self.steps = steps
        self.order = int(order)
        self.timestep_spacing = timestep_spacing
        self.clip_denoised = bool(clip_denoised)

    def timesteps(self, num_timesteps: int) -> list[int]:
        return dpm_solver_timesteps(num_timesteps, self.steps, self.timestep_spacing)

    def check(self, num_timesteps: int, learn_sigma: bool = False) -> None:
        """As :meth:`Sampler.check`, with the spacing's own bound on ``steps`` (:func:`dpm_solver_timesteps`: at most
        T - 1 for ``linspace`` and ``leading``)."""
        super().check(num_timesteps, learn_sigma)
        self.timesteps(num_timesteps)

    def _needs_noise(self, c: dict[str, float]) -> bool:
        return self.algorithm == "sde-dpmsolver++" and c["alphas_cumprod_prev"] < 1.0

    def _step(
        self, x: Tensor, pred: Prediction, c: dict[str, float], z: Tensor | None, v: Tensor | None, state: dict
    ) -> Tensor:
        abar_next = c["alphas_cumprod_prev"]
        lam, lam_next = _log_snr(c["alphas_cumprod"]), _log_snr(abar_next)
        alpha_next, sigma_next = math.sqrt(abar_next), math.sqrt(max(1.0 - abar_next, 0.0))
        h = lam_next - lam
        x0 = pred.x0
        data = x0
        if self.order == 2 and "x0" in state and abar_next < 1.0:  # the last step (into abar = 1) stays first order
            r = (lam - state["lambda"]) / h
            data = x0 + (0.5 / r) * (x0 - state["x0"])
        state["x0"], state["lambda"] = x0, lam
        # sigma_next / sigma_t, with sigma_t = sqrt(1 - abar_t) > 0 at every t >= 0; -expm1(-h) = 1 - exp(-h)
        ratio = sigma_next / c["sqrt_one_minus_alphas_cumprod"]
        if self.algorithm == "dpmsolver++":
            return ratio * x + (alpha_next * -math.expm1(-h)) * data
        keep = -math.expm1(-2.0 * h)  # 1 - exp(-2h)
        x_next = (ratio * math.exp(-h)) * x + (alpha_next * keep) * data
        return x_next if z is None else x_next + (sigma_next * math.sqrt(keep)) * z

    def __repr__(self) -> str:
        return (
            f"DPMSolverSampler(steps={self.steps}, order={self.order}, timestep_spacing={self.timestep_spacing!r}, "
            f"clip_denoised={self.clip_denoised}, algorithm={self.algorithm!r})"
        )
