"""EMA of the weights: decay schedule, buffers never averaged, samples and validation from the average."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.callbacks import EMA, ema_decay
from ddpm_lightning.errors import ConfigError


def test_ema_decay_warmup_values():
    # n-th update uses min(decay, (1 + n) / (10 + n))
    assert ema_decay(0.9999, 0) == pytest.approx(0.1)
    assert ema_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9999, 10**6) == 0.9999
    assert ema_decay(0.9999, 5, warmup=False) == 0.9999


def test_average_step_is_the_ema_formula():
    ema = EMA(decay=0.9, warmup=False)
    avg = torch.tensor([1.0, 2.0])
    cur = torch.tensor([3.0, -2.0])
    out = ema._average(avg, cur, torch.tensor(7))
    torch.testing.assert_close(out, 0.9 * avg + 0.1 * cur)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"decay": 1.0}, "decay"), ({"decay": -0.1}, "decay"), ({"update_every_n_steps": 0}, "update_every_n_steps")],
)
def test_bad_ema_settings(kwargs, key):
    """The callback names its own parameter; build(node, "callbacks.ema") adds the key path (test_bad_input.py)."""
    with pytest.raises(ConfigError, match=rf"^{key}=") as err:
        EMA(**kwargs)
    assert str(err.value.at("callbacks.ema")).startswith(f"callbacks.ema.{key}=")


def test_ema_run_keeps_the_schedule_exact_and_tracks_the_weights(tiny_train_overrides):
    from ddpm_lightning.training import train

    from conftest import compose_train

    result = train(
        compose_train(
            [*tiny_train_overrides, "trainer.max_epochs=1", "callbacks.ema.decay=0.5", "callbacks.ema.warmup=false"]
        )
    )
    from ddpm_lightning.checkpoint import load_ddpm
    from ddpm_lightning.config import build

    ckpt = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    # the schedule is not averaged or stored at all (non-persistent buffers, rebuilt from the config): the EMA model
    # loaded back has the exact float64 schedule of its config
    assert not [k for k in [*ema, *raw] if k.startswith("schedule.")]
    fresh = build(ckpt["hyper_parameters"]["config"]["schedule"])
    loaded = load_ddpm(result["last_ckpt"], use_ema=True).schedule
    for name in ["betas", "alphas_cumprod", "posterior_variance"]:
        assert getattr(loaded, name).dtype == torch.float64 and torch.equal(getattr(loaded, name), getattr(fresh, name))
    # the average lags the raw weights but is not the initial or the raw weights
    diffs = [(ema[k] - raw[k]).abs().max().item() for k in raw if k.startswith("net.") and raw[k].is_floating_point()]
    assert max(diffs) > 0
    assert int(ckpt["averaging_state"]["n_averaged"]) == 2


def test_ema_off_switch(tiny_train_overrides):
    from ddpm_lightning.training import train

    from conftest import compose_train

    result = train(compose_train([*tiny_train_overrides, "callbacks.ema=null"]))
    ckpt = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)
    assert "current_model_state" not in ckpt and "averaging_state" not in ckpt


def _ema_on(module: torch.nn.Module, **kwargs) -> EMA:
    from torch.optim.swa_utils import AveragedModel

    ema = EMA(**kwargs)
    ema._average_model = AveragedModel(module, use_buffers=False)
    return ema


def test_the_foreach_update_is_the_ema_recursion_and_reads_nothing_back():
    """n updates of the one-kernel foreach EMA == the recursion ema <- d_n ema + (1 - d_n) w with d_n = ema_decay(n)
    in float64 (the first update copies), with no host read; the count is a Python int."""
    from ddpm_lightning.sync_census import SyncCensus

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = _ema_on(module, decay=0.99)
    reference = None
    with SyncCensus() as census:
        for n in range(30):
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(torch.randn_like(p))
            ema.update(module)
            weights = [p.detach().double().clone() for p in module.parameters()]
            if reference is None:
                reference = weights
            else:
                d = ema_decay(0.99, n)
                reference = [d * r + (1 - d) * w for r, w in zip(reference, weights, strict=True)]
    assert census.count() == 0, census.summary()
    assert ema.num_averaged == 30 and isinstance(ema.num_averaged, int)
    for averaged, expected in zip(ema.average_module.parameters(), reference, strict=True):
        torch.testing.assert_close(averaged.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_checkpoint_layout_is_lightnings_both_ways():
    """Saving writes the host count into averaging_state["n_averaged"] (Lightning's WeightAveraging layout, so a
    checkpoint of either version loads in the other); loading reads it back once, and a checkpoint without EMA state
    starts the count at 0 (the next update copies the weights, as before)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    ema = _ema_on(module, decay=0.9)
    for _ in range(5):
        ema.update(module)
    checkpoint = {"state_dict": module.state_dict()}
    ema.on_save_checkpoint(None, module, checkpoint)
    assert int(checkpoint["averaging_state"]["n_averaged"]) == 5
    assert set(checkpoint["state_dict"]) == set(module.state_dict()) and "current_model_state" in checkpoint
    resumed = _ema_on(torch.nn.Linear(3, 2), decay=0.9)
    resumed.on_load_checkpoint(None, module, checkpoint)
    assert resumed.num_averaged == 5
    for a, b in zip(resumed.average_module.parameters(), ema.average_module.parameters(), strict=True):
        assert torch.equal(a, b)
    plain = _ema_on(torch.nn.Linear(3, 2), decay=0.9)
    plain.on_load_checkpoint(None, module, {"state_dict": module.state_dict()})
    assert plain.num_averaged == 0
