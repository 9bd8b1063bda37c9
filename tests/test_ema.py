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


@pytest.mark.parametrize("kwargs, key", [({"decay": 1.0}, "decay"), ({"decay": -0.1}, "decay"),
                                         ({"update_every_n_steps": 0}, "update_every_n_steps")])
def test_bad_ema_settings(kwargs, key):
    """The callback names its own parameter; build(node, "callbacks.ema") adds the key path (test_bad_input.py)."""
    with pytest.raises(ConfigError, match=rf"^{key}=") as err:
        EMA(**kwargs)
    assert str(err.value.at("callbacks.ema")).startswith(f"callbacks.ema.{key}=")


def test_ema_run_keeps_the_schedule_exact_and_tracks_the_weights(tiny_train_overrides):
    from conftest import compose_train

    from ddpm_lightning.training import train

    result = train(compose_train([*tiny_train_overrides, "trainer.max_epochs=1", "callbacks.ema.decay=0.5",
                                  "callbacks.ema.warmup=false"]))
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
    from conftest import compose_train

    from ddpm_lightning.training import train

    result = train(compose_train([*tiny_train_overrides, "callbacks.ema=null"]))
    ckpt = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)
    assert "current_model_state" not in ckpt and "averaging_state" not in ckpt
