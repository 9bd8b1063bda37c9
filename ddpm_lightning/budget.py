"""A training budget in wall-clock time: a run's progress is the larger of its steps and its time, so that a preset
anneals its learning rate by the end of the budget on a slow machine as on a fast one.

Progress ``p = max(step / trainer.max_steps, elapsed / seconds)``, with ``seconds`` the training's share of the budget:
``budget.minutes`` for the whole command, less what came before training (start-up, data) and what is kept for after
it (``budget.reserve``: the last checkpoint, the grid and the evaluation, measured at start). Training stops when
``p`` reaches 1, at a step boundary, and the end-of-run work follows. A schedule that decays to zero at the end of the
real budget beats the same schedule cut short (Li, Yumer & Ramanan 2020, "Budgeted Training", ICLR).

* :class:`BudgetOneCycleLR`: torch's ``OneCycleLR`` at the virtual step ``max(step, time_fraction * (total - 1))``.
  With no time budget it is exactly ``OneCycleLR`` (a step-budget run is bit-exact on resume, as before).
* :class:`TimeBudget`: the callback that measures the time, hands the fraction to the schedule and stops training.
  Its elapsed time and its training seconds are saved in checkpoints, so a resumed run continues the same schedule.
  Under DDP rank zero's clock is broadcast every ``sync_every`` steps (the same steps on every rank), so every rank
  has the same learning rate and stops at the same step.
* What else follows the run's length already does so in steps done: the EMA's warm-up decay
  ``min(0.9999, (1 + n) / (10 + n))`` averages over about the last 11% of the ``n`` steps done (the 0.9999 cap binds
  only after ~90,000 steps), and the importance sampler leaves its warm-up once every timestep has 10 losses.

A time-budget run is not reproducible step for step: where it stops, and the learning rate of each step, depend on
the machine's speed (and its load) at the time. A step budget (``budget.minutes=null``) is.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import OneCycleLR

from ddpm_lightning.errors import invalid, is_number


class BudgetOneCycleLR(OneCycleLR):
    """``torch.optim.lr_scheduler.OneCycleLR`` whose step can be overtaken by the time budget.

    ``time_fraction`` (in [0, 1], set by :class:`TimeBudget`) moves the schedule to the virtual step
    ``max(last_epoch, time_fraction * (total_steps - 1))``: at time fraction 1 the learning rate is the schedule's last,
    ``max_lr / div_factor / final_div_factor``. With ``time_fraction = 0`` every value is ``OneCycleLR``'s.
    Arguments: as ``OneCycleLR`` (Smith & Topin 2019).
    """

    time_fraction: float = 0.0

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        virtual = max(float(step), min(self.time_fraction, 1.0) * (self.total_steps - 1))
        if virtual == step:
            return super().get_lr()
        try:
            self.last_epoch = virtual
            return super().get_lr()
        finally:
            self.last_epoch = step

    def set_time_fraction(self, fraction: float) -> None:
        """Move to ``fraction`` of the time budget now: the optimizer's learning rate (that of its next update) is
        recomputed at once, not at the next ``step()``, so the time spent since (an epoch end, a validation) counts."""
        self.time_fraction = float(fraction)
        with _get_lr_allowed(self):
            lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class _get_lr_allowed:
    """torch warns when ``get_lr()`` is called outside ``step()``; this is the flag ``step()`` itself sets."""

    def __init__(self, scheduler: OneCycleLR) -> None:
        self.scheduler = scheduler

    def __enter__(self) -> None:
        self.scheduler._get_lr_called_within_step = True

    def __exit__(self, *exc: Any) -> None:
        self.scheduler._get_lr_called_within_step = False


def parse_minutes(value: Any, key: str = "budget.minutes") -> float | None:
    """``budget.minutes``: None, a number of minutes > 0, or ``"HH:MM:SS"`` / ``"DD:HH:MM:SS"`` (as
    ``trainer.max_time``).

    Raises:
        ConfigError: naming ``key``.
    """
    if value is None:
        return None
    if is_number(value) and math.isfinite(value) and value > 0:
        return float(value)
    if isinstance(value, str) and all(part.isdigit() for part in value.split(":")) and 3 <= value.count(":") + 1 <= 4:
        parts = [int(p) for p in value.split(":")]
        days, hours, minutes, seconds = [0] * (4 - len(parts)) + parts
        total = days * 1440 + hours * 60 + minutes + seconds / 60
        if total > 0:
            return total
    raise invalid(key, value, 'must be null, a number of minutes > 0, or "HH:MM:SS"')


class TimeBudget(L.Callback):
    """Ends training when its share of a wall-clock budget is spent, and gives the learning-rate schedule the time
    fraction (see the module's docstring).

    Args:
        deadline: ``time.monotonic()`` by which training must end (the command's start + budget - reserve); the
            training's share, ``seconds``, is fixed when training starts (``deadline - now``) and saved in checkpoints.
        sync_every: under DDP, broadcast rank zero's clock every this many steps (1 process: every step).

    Attributes:
        seconds: the training's share of the budget (None before training starts).
        elapsed: training seconds spent so far, counting every earlier attempt of a resumed run.
        time_fraction: ``min(1, elapsed / seconds)`` at the last update.
    """

    def __init__(self, deadline: float, sync_every: int = 10) -> None:
        self.deadline = float(deadline)
        self.sync_every = max(int(sync_every), 1)
        self.seconds: float | None = None
        self.elapsed = 0.0
        self.time_fraction = 0.0
        self.stopped_by_budget = False
        self._started = 0.0
        self._base = 0.0

    @property
    def state_key(self) -> str:
        return "TimeBudget"

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds = state.get("seconds")
        self.elapsed = float(state.get("elapsed", 0.0))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.monotonic()
        if self.seconds is None:  # a fresh run: what is left of the budget; a resumed one keeps its own
            self.seconds = max(self.deadline - now, 1.0)
            if trainer.world_size > 1:  # rank zero's, so that every rank computes the same fraction
                self.seconds = float(trainer.strategy.broadcast(self.seconds, src=0))
        self._started, self._base = now, self.elapsed
        self._publish(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size == 1:  # the time since the last step (an epoch end, a validation) counts for this one
            self.elapsed = self._base + time.monotonic() - self._started
            self._publish(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size > 1 and trainer.global_step % self.sync_every:
            return
        elapsed = self._base + time.monotonic() - self._started
        if trainer.world_size > 1:  # every rank takes rank zero's clock, at the same steps
            elapsed = float(trainer.strategy.broadcast(elapsed, src=0))
        self.elapsed = elapsed
        self._publish(trainer)
        if self.time_fraction >= 1.0 and not self.stopped_by_budget:
            self.stopped_by_budget = True
            trainer.should_stop = True
            rank_zero_info(
                f"time budget spent: training stops at global step {trainer.global_step} "
                f"({self.elapsed:.0f} s of {self.seconds:.0f} s)"
            )

    def _publish(self, trainer: L.Trainer) -> None:
        self.time_fraction = min(1.0, self.elapsed / self.seconds) if self.seconds else 0.0
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, BudgetOneCycleLR):
                config.scheduler.set_time_fraction(self.time_fraction)
