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

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
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

    The state lives on the device of the training tensors (moved there once, by the first :meth:`sample` or
    :meth:`update`) and is updated there without reading anything back to the host: a ring buffer per t, written by
    one scatter per step, so that a training step on a GPU never waits for it.

    State: ``ring`` ``(T, HISTORY)`` float64, the newest losses of each t in a ring (slot ``written % HISTORY`` is the
    next to be overwritten), and ``written`` ``(T,)`` int64, the losses seen per t. The checkpoint
    (:meth:`state_dict`) also holds the layout of the first version, ``history`` (the ring in chronological order,
    oldest first) and ``counts`` (``written`` capped at HISTORY), so that a checkpoint written by either version
    resumes in both.
    """

    stateful = True

    def __init__(self, num_timesteps: int, history: int = HISTORY, uniform_prob: float = UNIFORM_PROB) -> None:
        super().__init__(num_timesteps)
        self.uniform_prob = float(uniform_prob)
        self.size = int(history)
        T, H = self.num_timesteps, self.size
        # one spare element at the end of each buffer takes the writes that must be dropped (see update)
        self._ring = torch.zeros(T * H + 1, dtype=torch.float64)
        self._written = torch.zeros(T + 1, dtype=torch.long)

    # ------------------------------------------------------------------------------------------------ views
    @property
    def ring(self) -> Tensor:
        """``(T, HISTORY)`` float64: the ring of the newest losses per t (a view)."""
        return self._ring[: self.num_timesteps * self.size].view(self.num_timesteps, self.size)

    @property
    def written(self) -> Tensor:
        """``(T,)`` int64: losses recorded per t since the start (a view)."""
        return self._written[: self.num_timesteps]

    @property
    def counts(self) -> Tensor:
        """``(T,)`` int64: the losses held per t, ``min(written, HISTORY)``."""
        return self.written.clamp(max=self.size)

    @property
    def history(self) -> Tensor:
        """``(T, HISTORY)`` float64: each t's held losses in the order they came, oldest first (zeros after the
        ``counts[t]`` held ones)."""
        written = self.written
        start = torch.where(written >= self.size, written % self.size, torch.zeros_like(written))
        index = (start[:, None] + torch.arange(self.size, device=written.device)) % self.size
        return self.ring.gather(1, index)

    def _warmed_up(self) -> Tensor:
        """0-dim bool tensor on the state's device: every t has a full history."""
        return (self.written >= self.size).all()

    @property
    def warmed_up(self) -> bool:
        """True once every timestep has a full history (reads the device: for tests and inspection, not per step)."""
        return bool(self._warmed_up())

    def _place(self, device: torch.device | str) -> None:
        """Move the state to ``device`` (once: a no-op when it is there)."""
        device = torch.device(device)
        if self._ring.device != device:
            self._ring = self._ring.to(device)
            self._written = self._written.to(device)

    # ------------------------------------------------------------------------------------------------ sampling
    def probabilities(self) -> Tensor:
        """``(T,)`` float64 p_t on the state's device: uniform until every t has HISTORY losses, then
        ``(1 - UNIFORM_PROB) sqrt(E[L_t^2]) / sum + UNIFORM_PROB / T``; chosen on the device, with no read-back."""
        weights = self.ring.pow(2).mean(1).sqrt()
        weights = weights / weights.sum()
        importance = weights * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        uniform = torch.full_like(importance, 1.0 / self.num_timesteps)
        return torch.where(self._warmed_up(), importance, uniform)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(t, weights)`` drawn with ``torch.multinomial`` from :meth:`probabilities` on ``device`` (where the state
        moves), from ``generator`` (on ``device``) or the global RNG; weights ``1 / (T p_t)``, exactly 1 during the
        warm-up."""
        self._place(device)
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = torch.where(self._warmed_up(), 1.0 / (self.num_timesteps * p[t]), torch.ones_like(p[t]))
        return t, weights.float()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Push each loss into its timestep's ring, in the order given (pass every rank's losses in rank order), on
        the device without a read-back: the batch is sorted by t (stably), each loss gets its rank among the equal
        t's, and one scatter writes the last HISTORY of each t (any earlier ones of the same t in this batch would
        be overwritten anyway; their writes go to a spare element)."""
        self._place(t.device)
        T, H = self.num_timesteps, self.size
        t = t.detach().long().reshape(-1)
        losses = losses.detach().to(torch.float64).reshape(-1)
        n = t.numel()
        order = torch.argsort(t, stable=True)
        ts = t[order]
        first = torch.searchsorted(ts, ts)  # the sorted position of the first loss of this t
        group = torch.searchsorted(ts, ts, right=True) - first  # losses of this t in the batch
        rank = torch.arange(n, device=t.device) - first  # 0 for the first loss of its t, 1 for the next, ...
        written = self._written[ts]
        flat = ts * H + (written + rank) % H
        self._ring.index_put_((torch.where(rank >= group - H, flat, T * H),), losses[order])
        # each t's count once, from its first loss in the batch (unique targets, the rest to the spare element)
        self._written.index_put_((torch.where(rank == 0, ts, T),), written + group)

    # ------------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Tensor]:
        """On the CPU: ``ring`` and ``written`` (this version's state) and ``history`` / ``counts`` (the first
        version's layout; see the class docstring)."""
        return {
            "ring": self.ring.cpu().clone(),
            "written": self.written.cpu().clone(),
            "history": self.history.cpu(),
            "counts": self.counts.cpu(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Either layout: ``ring`` + ``written``, or the first version's ``history`` (chronological, oldest first) +
        ``counts`` (capped at HISTORY), which is a ring whose next slot is the oldest loss.

        Raises:
            ValueError: a state for another T or HISTORY.
        """
        shape = tuple(state["ring" if "ring" in state else "history"].shape)
        if shape != (self.num_timesteps, self.size):
            raise ValueError(f"timestep sampler state for {shape} does not fit {(self.num_timesteps, self.size)}")
        ring, written = (state["ring"], state["written"]) if "ring" in state else (state["history"], state["counts"])
        device = self._ring.device
        self._ring = torch.cat([ring.reshape(-1).to(torch.float64), torch.zeros(1, dtype=torch.float64)]).to(device)
        self._written = torch.cat([written.to(torch.long), torch.zeros(1, dtype=torch.long)]).to(device)


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
