"""How training draws its timesteps: uniformly (Ho et al. 2020, Algorithm 1) or by importance sampling on the
second moment of each timestep's recent losses (Nichol & Dhariwal 2021, arXiv:2102.09672, Eq. 18 and Sec. 3.3,
"loss-second-moment"). No Lightning or Hydra import here.

Importance sampling draws ``t ~ p_t`` with ``p_t ∝ sqrt(E[L_t^2])`` over the last :data:`HISTORY` losses of each t,
mixed with :data:`UNIFORM_PROB` of the uniform distribution, and weights each loss by ``1 / (T p_t)``, so that
``E_{t ~ p}[L_t / (T p_t)] = (1/T) sum_t L_t``: the estimate of the objective stays unbiased. Until every t has
:data:`HISTORY` losses it samples uniformly (weights 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm_lightning.errors import invalid

TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")
HISTORY = 10  #: losses remembered per timestep
UNIFORM_PROB = 0.001  #: the uniform share of the importance distribution


class UniformTimesteps:
    """``t ~ U{0, ..., T-1}`` with weight 1 (Ho et al. 2020, Algorithm 1)."""

    stateful = False  #: True when :meth:`update` changes what is drawn (state worth saving and sharing)

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = int(num_timesteps)

    def probabilities(self) -> Tensor:
        """``(T,)`` float64 p_t, summing to 1."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(t, weights)``: ``(batch_size,)`` int64 timesteps in [0, T-1] and float32 weights ``1 / (T p_t)``, on
        ``device``; drawn from ``generator`` (on ``device``; the importance sampler's on the CPU) or the global RNG."""
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)
        return t, torch.ones(batch_size, device=device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the per-sample losses of timesteps ``t`` (nothing for the uniform sampler)."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class LossSecondMomentTimesteps(UniformTimesteps):
    """Importance sampling of timesteps on ``sqrt(E[L_t^2])`` (see the module docstring).

    State (saved in checkpoints by the DDPM module, so that a resumed run draws what an uninterrupted one would):
    ``history`` ``(T, HISTORY)`` float64, the newest losses of each t in a ring, and ``counts`` ``(T,)`` int64, the
    losses seen per t (capped at HISTORY).
    """

    stateful = True

    def __init__(self, num_timesteps: int, history: int = HISTORY, uniform_prob: float = UNIFORM_PROB) -> None:
        super().__init__(num_timesteps)
        self.uniform_prob = float(uniform_prob)
        self.history = torch.zeros(self.num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    @property
    def warmed_up(self) -> bool:
        """True once every timestep has a full history."""
        return bool((self.counts >= self.history.shape[1]).all())

    def probabilities(self) -> Tensor:
        if not self.warmed_up:
            return super().probabilities()
        weights = self.history.pow(2).mean(1).sqrt()
        weights = weights / weights.sum()
        return weights * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if not self.warmed_up:
            return super().sample(batch_size, device, generator)
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Push each loss into its timestep's ring (in the order given: pass every rank's losses in rank order)."""
        size = self.history.shape[1]
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[step] == size:
                self.history[step, :-1] = self.history[step, 1:].clone()
                self.history[step, -1] = loss
            else:
                self.history[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if tuple(state["history"].shape) != tuple(self.history.shape):
            raise ValueError(f"timestep sampler state for {tuple(state['history'].shape)} does not fit {tuple(self.history.shape)}")
        self.history = state["history"].to(torch.float64).clone()
        self.counts = state["counts"].to(torch.long).clone()


def make_timestep_sampler(kind: object, num_timesteps: int) -> UniformTimesteps:
    """The timestep sampler ``kind`` (``uniform`` or ``loss-second-moment``) for a schedule of T steps.

    Raises:
        ConfigError: naming ``timestep_sampler``.
    """
    if kind == "uniform":
        return UniformTimesteps(num_timesteps)
    if kind == "loss-second-moment":
        return LossSecondMomentTimesteps(num_timesteps)
    raise invalid("timestep_sampler", kind, f"must be one of {list(TIMESTEP_SAMPLERS)}")
