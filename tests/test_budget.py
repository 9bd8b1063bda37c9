"""The wall-clock training budget (ddpm_lightning/budget.py): progress = max(step / max_steps, time / its share of the
budget) drives the one-cycle learning rate to its end whichever of the two ends training, and a resumed run continues
the same schedule."""

from __future__ import annotations

import time

import pytest
import torch

from ddpm_lightning.budget import BudgetOneCycleLR, TimeBudget, parse_minutes
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.module import DDPM
from ddpm_lightning.training import RunContext, end_of_run_seconds, train

from conftest import TINY_TRAIN, compose_train

PEAK = 1e-3


def _onecycle(cls, total: int = 50, pct_start: float = 0.1):
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=PEAK)
    return opt, cls(
        opt,
        max_lr=PEAK,
        total_steps=total,
        pct_start=pct_start,
        anneal_strategy="cos",
        cycle_momentum=False,
        div_factor=25.0,
        final_div_factor=1e4,
    )


def test_without_time_the_schedule_is_torchs_onecycle_exactly():
    ref_opt, ref = _onecycle(torch.optim.lr_scheduler.OneCycleLR)
    opt, ours = _onecycle(BudgetOneCycleLR)
    for _ in range(49):
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        ref_opt.step(), ref.step(), opt.step(), ours.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == pytest.approx(PEAK / 25 / 1e4)


def test_the_time_fraction_moves_the_schedule_to_its_virtual_step():
    """At time fraction f the lr is OneCycleLR's at step f * (total - 1) when that is ahead of the real step; at f = 1
    it is the schedule's last value, whatever the real step."""
    total = 50
    ref_opt, ref = _onecycle(torch.optim.lr_scheduler.OneCycleLR, total)
    ref_lrs = [ref_opt.param_groups[0]["lr"]]
    for _ in range(total - 1):
        ref_opt.step(), ref.step()
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
    opt, ours = _onecycle(BudgetOneCycleLR, total)
    for _ in range(3):  # real step 3
        opt.step(), ours.step()
    ours.time_fraction = 30 / (total - 1)  # virtual step 30
    opt.step(), ours.step()  # computes the lr of real step 4 -> max(4, 30) = 30
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_lrs[30], rel=1e-12)
    ours.time_fraction = 0.01  # behind the real step: the real step wins
    opt.step(), ours.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_lrs[5], rel=1e-12)
    ours.time_fraction = 1.0
    opt.step(), ours.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_lrs[-1], rel=1e-12) and ref_lrs[-1] < 0.05 * PEAK


@pytest.mark.parametrize(
    "value, minutes", [(29, 29.0), (0.5, 0.5), ("00:29:00", 29.0), ("00:00:29:30", 29.5), (None, None)]
)
def test_budget_minutes_take_minutes_or_a_clock_time(value, minutes):
    assert parse_minutes(value) == minutes


@pytest.mark.parametrize("value", [0, -1, float("inf"), "soon", "29:00", "1:2:3:4:5", True])
def test_a_bad_budget_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^budget.minutes=.* is invalid: must be null, a number of minutes > 0"):
        parse_minutes(value)


def test_a_bad_budget_stops_ddpm_train_before_any_work(tiny_train_overrides, tmp_path):
    for override, needle in [
        ("budget.minutes=-5", "budget.minutes=-5 is invalid"),
        ("budget.reserve=soon", "budget.reserve='soon' is invalid: must be auto"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            train(compose_train([*tiny_train_overrides, override]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def _train_recording_lrs(overrides: list[str], monkeypatch, sleep_s: float = 0.0, context: RunContext | None = None):
    """train() with the lr of every optimizer step recorded (and ``sleep_s`` added to every step: a slow machine)."""
    lrs: list[float] = []
    original = DDPM.training_step

    def step(self, batch, batch_idx):
        lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])  # the lr this step's update uses
        time.sleep(sleep_s)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DDPM, "training_step", step)
    return train(compose_train(overrides), context), lrs


def _budget_of(result) -> TimeBudget:
    return next(c for c in result["trainer"].callbacks if isinstance(c, TimeBudget))


@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_a_fast_machine_ends_at_max_steps_with_the_lr_annealed(tiny_train_overrides, monkeypatch):
    result, lrs = _train_recording_lrs(
        [
            *tiny_train_overrides,
            "lr_scheduler=onecycle",
            "trainer.max_epochs=-1",
            "trainer.max_steps=24",
            f"optimizer.lr={PEAK}",
            "budget.minutes=30",
            "budget.reserve=0",
            "callbacks.samples.every_n_epochs=0",
        ],
        monkeypatch,
    )
    budget = _budget_of(result)
    assert result["trainer"].global_step == 24 == len(lrs) and not budget.stopped_by_budget
    assert max(lrs) == pytest.approx(PEAK, rel=0.01) and lrs[-1] <= 0.05 * max(lrs)
    assert budget.time_fraction < 0.1  # steps, not time, ended it


@pytest.mark.slow
def test_a_slow_machine_ends_at_the_budget_with_the_lr_annealed(tiny_train_overrides, monkeypatch):
    """Every step sleeps 0.15 s and the whole budget is 6 s (none kept back): the time ends training long before
    max_steps, and its last steps still run at the end of the one-cycle schedule."""
    result, lrs = _train_recording_lrs(
        [
            *tiny_train_overrides,
            "lr_scheduler=onecycle",
            "trainer.max_epochs=-1",
            "trainer.max_steps=1000",
            f"optimizer.lr={PEAK}",
            "budget.minutes=0.1",
            "budget.reserve=0",
            "callbacks.samples.every_n_epochs=0",
        ],
        monkeypatch,
        sleep_s=0.15,
        context=RunContext(),
    )
    budget = _budget_of(result)
    steps = result["trainer"].global_step
    assert budget.stopped_by_budget and 2 <= steps < 1000 and len(lrs) == steps
    assert max(lrs) > 0.5 * PEAK  # the warm-up reached the peak: the schedule ran its course in time, not steps
    assert lrs[-1] <= 0.05 * max(lrs), lrs
    ckpt = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps  # the last checkpoint holds the final state
    assert ckpt["callbacks"]["TimeBudget"]["elapsed"] >= ckpt["callbacks"]["TimeBudget"]["seconds"]


@pytest.mark.slow
def test_a_resumed_time_budget_run_continues_its_schedule(tiny_train_overrides, tmp_path, monkeypatch):
    """The budget's training seconds and its elapsed time are saved in the checkpoint; a resumed run keeps the first's
    seconds, counts on from its elapsed time, and so continues the same schedule: its first update uses the lr of the
    saved time fraction (by its step alone it would be a warm-up lr), and it ends annealed."""
    total = 200
    common = [
        *tiny_train_overrides,
        "lr_scheduler=onecycle",
        f"trainer.max_steps={total}",
        f"optimizer.lr={PEAK}",
        "budget.minutes=0.15",
        "budget.reserve=0",
        "callbacks.samples.every_n_epochs=0",
    ]
    first, _ = _train_recording_lrs([*common, "trainer.max_epochs=3"], monkeypatch, sleep_s=0.3, context=RunContext())
    ckpt = torch.load(first["last_ckpt"], map_location="cpu", weights_only=True)
    saved = ckpt["callbacks"]["TimeBudget"]
    assert first["trainer"].global_step == 6 and 0 < saved["elapsed"] < saved["seconds"]
    resumed, lrs = _train_recording_lrs(
        [*common, "trainer.max_epochs=-1", f"ckpt_path={first['last_ckpt']}"],
        monkeypatch,
        sleep_s=0.3,
        context=RunContext(),
    )
    budget = _budget_of(resumed)
    assert budget.seconds == saved["seconds"]  # the first run's share, not a new one
    assert budget.stopped_by_budget and budget.elapsed >= saved["seconds"]
    ref_opt, ref = _onecycle(BudgetOneCycleLR, total=total, pct_start=0.05)
    for _ in range(6):  # real step 6: the resumed run's first update
        ref_opt.step(), ref.step()
    by_steps = ref_opt.param_groups[0]["lr"]

    def lr_at(elapsed: float) -> float:
        ref.set_time_fraction(elapsed / saved["seconds"])
        return ref_opt.param_groups[0]["lr"]

    assert saved["elapsed"] / saved["seconds"] * (total - 1) > 10  # the saved time, past the warm-up, sets that lr
    # the lr of the saved time fraction, give or take the seconds the resumed fit takes to reach its first step
    assert lr_at(saved["elapsed"]) >= lrs[0] >= lr_at(saved["elapsed"] + 3.0)
    assert lr_at(0.0) == by_steps  # the reference: at time fraction 0 it is OneCycleLR's lr of step 6
    assert lrs[-1] <= 0.05 * PEAK


def test_the_end_of_run_work_is_timed_on_this_machine(tiny_run):
    """The reserve grows with the evaluation's samples and steps, on top of the fixed allowance."""
    from types import SimpleNamespace

    from ddpm_lightning.checkpoint import load_ddpm
    from ddpm_lightning.training import END_OF_RUN_FIXED_S

    model = load_ddpm(tiny_run["last_ckpt"])
    grid = SimpleNamespace(sampler=None, num_samples=4, guidance_scale=1.0)
    small = SimpleNamespace(num_samples=8, batch_size=8, guidance_scale=1.0)
    big = SimpleNamespace(num_samples=64, batch_size=16, guidance_scale=1.0)
    alone = end_of_run_seconds(model, grid, None, None)
    assert (
        END_OF_RUN_FIXED_S
        < alone
        < end_of_run_seconds(model, grid, small, 2)
        < end_of_run_seconds(model, grid, big, 20)
    )


def test_the_cpu_presets_are_budgeted_for_the_whole_command():
    for name in ("mnist_cpu", "mnist_cpu_cfg"):
        cfg = compose_train([f"experiment={name}"])
        assert parse_minutes(cfg.budget.minutes) <= 30 and cfg.lr_scheduler._target_.endswith("BudgetOneCycleLR")
        assert cfg.trainer.get("max_time") is None  # the budget, not a cut, ends training


def test_tiny_train_has_no_budget():
    assert compose_train(TINY_TRAIN).budget.minutes is None
