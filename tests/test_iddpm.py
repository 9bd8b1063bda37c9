"""Improved DDPM in the workflow: learned-sigma networks, L_hybrid / L_vlb in training_step, importance-sampled
timesteps in checkpoints and across DDP ranks, ``ddpm-evaluate nll=true``, the ``val/bpd`` callback, the
``experiment=iddpm`` presets and ``ddpm-report``'s bits/dim columns. The maths itself: test_losses.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddpm_lightning.config import compose_config
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.losses import model_log_variance, model_mean, training_vb, vb_terms
from ddpm_lightning.module import DDPM, derive_seed
from ddpm_lightning.networks import ADMUNetEps, DiffUNetEps
from ddpm_lightning.samplers import DDPMSampler
from ddpm_lightning.schedule import NoiseSchedule
from ddpm_lightning.timestep_sampling import HISTORY, LossSecondMomentTimesteps
from ddpm_lightning.training import train

from conftest import compose_train

#: A tiny learned-sigma L_hybrid run on a 4-step schedule (so that importance sampling warms up within a few steps).
IDDPM_TINY = ["model.learn_sigma=true", "diffusion.loss=hybrid", "sampler.variance=learned"]


def tiny_sigma_net(**kwargs) -> ADMUNetEps:
    return ADMUNetEps(model_channels=32, channel_mult=[1], attn_resolutions=[], dropout=0.0, learn_sigma=True, **kwargs)


def _grid(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 32, 32), generator=torch.Generator().manual_seed(n)).float() / 255 * 2 - 1


# ------------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("patch_size", [1, 2])
def test_admunet_with_learn_sigma_outputs_eps_then_v(patch_size):
    net = tiny_sigma_net(patch_size=patch_size)
    out = net(torch.randn(3, 1, 32, 32), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 2, 32, 32) and net.learn_sigma
    model = DDPM(net, NoiseSchedule(timesteps=10))
    eps, v = model.model_output(torch.randn(3, 1, 32, 32), torch.tensor([0, 5, 9]))
    assert eps.shape == v.shape == (3, 1, 32, 32) and model.learn_sigma


def test_diffunet_with_learn_sigma_outputs_2c_channels():
    net = DiffUNetEps(in_channels=1, learn_sigma=True)
    assert net.net.out_channels == 2
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, 32, 32), torch.tensor([3]))
    assert out.shape == (1, 2, 32, 32)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_learn_sigma_must_be_a_boolean(value):
    with pytest.raises(ConfigError, match=rf"^learn_sigma={value!r} is invalid: must be true"):
        ADMUNetEps(model_channels=32, channel_mult=[1], attn_resolutions=[], learn_sigma=value)


# ------------------------------------------------------------------------------------------------ training_step
def _draws(seed: int, T: int, n: int, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(derive_seed(seed, "train", 0, 0))
    return torch.randint(0, T, (n,)), torch.randn_like(x0)


def _reference_vb(model: DDPM, x0, t, noise, stop_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mse, vb bits/dim) per sample, from the loss maths written out here on the model's own output."""
    x_t = model.schedule.q_sample(x0, t, noise)
    out = model.net(x_t, t)
    eps, v = out[:, :1], out[:, 1:]
    mse = ((eps - noise) ** 2).flatten(1).mean(1)
    mean = model_mean(
        model.schedule, x_t, t, model.schedule.predict_x0_from_eps(x_t, t, eps.detach() if stop_grad else eps)
    )
    px = vb_terms(model.schedule, x0, x_t, t, mean, model_log_variance(model.schedule, t, x_t, "learned", v))
    return mse, px.flatten(1).sum(1) / (1024 * math.log(2))


def test_hybrid_training_step_is_l_simple_plus_lambda_T_vb():
    torch.manual_seed(0)
    model = DDPM(tiny_sigma_net(), NoiseSchedule(timesteps=100), seed=5, loss="hybrid", vlb_weight=0.001)
    x0 = _grid(6)
    loss = model.training_step((x0, torch.zeros(6, dtype=torch.long)), 0)
    t, noise = _draws(5, 100, 6, x0)
    mse, vb = _reference_vb(model, x0, t, noise, stop_grad=True)
    torch.testing.assert_close(loss.double(), (mse.double() + 0.001 * 100 * vb).mean(), rtol=1e-5, atol=1e-7)


def test_vlb_with_importance_sampling_weights_each_loss_by_one_over_T_p():
    T = 8
    torch.manual_seed(0)
    model = DDPM(
        tiny_sigma_net(), NoiseSchedule(timesteps=T), seed=2, loss="vlb", timestep_sampler="loss-second-moment"
    )
    warm = LossSecondMomentTimesteps(T)
    for k in range(HISTORY):  # a warmed-up history: losses growing with t
        warm.update(torch.arange(T), torch.arange(1, T + 1, dtype=torch.float32) * (1 + k % 3))
    model.timestep_sampler.load_state_dict(warm.state_dict())
    p = warm.probabilities()
    x0 = _grid(5)
    loss = model.training_step((x0, torch.zeros(5, dtype=torch.long)), 0)
    torch.manual_seed(derive_seed(2, "train", 0, 0))
    t = torch.multinomial(p, 5, replacement=True)
    noise = torch.randn_like(x0)
    _, vb = _reference_vb(model, x0, t, noise, stop_grad=False)
    weights = 1.0 / (T * p[t])
    assert not torch.allclose(weights, torch.ones_like(weights))
    torch.testing.assert_close(loss.double(), (T * vb * weights).mean(), rtol=1e-5, atol=1e-7)
    # the step's unweighted losses went into the history
    assert int(model.timestep_sampler.counts.sum()) == T * HISTORY


def test_vlb_trains_the_mean_and_hybrid_only_the_variance_through_the_vb_term():
    x0 = _grid(4)
    t = torch.tensor([0, 3, 10, 40])
    noise = torch.randn_like(x0)
    for loss, mean_gets_vb_gradient in (("hybrid", False), ("vlb", True)):
        model = DDPM(tiny_sigma_net(), NoiseSchedule(timesteps=50), loss=loss)
        x_t = model.schedule.q_sample(x0, t, noise)
        out = model.net(x_t, t).detach().requires_grad_(True)  # the network's output: eps, then v
        vb = training_vb(model.schedule, x0, x_t, t, out[:, :1], out[:, 1:], stop_grad_mean=model.loss == "hybrid")
        (g,) = torch.autograd.grad(vb.sum(), [out])
        assert (float(g[:, :1].abs().sum()) > 0) == mean_gets_vb_gradient and float(g[:, 1:].abs().sum()) > 0


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_a_tiny_iddpm_run_logs_mse_vb_and_bpd_and_evaluates_its_bound(tiny_train_overrides, tmp_path, fake_mnist_root):
    from ddpm_lightning.evaluation import evaluate
    from ddpm_lightning.training import end_of_run_options

    cfg = compose_train(
        [
            *tiny_train_overrides,
            *IDDPM_TINY,
            "schedule.timesteps=50",
            "callbacks.bpd.every_n_epochs=1",
            "callbacks.bpd.num_images=3",
            "sampler.steps=5",
            "++evaluate.num_samples=4",
            "++evaluate.nll=true",
            "++evaluate.nll_n=3",
            "++evaluate.batch_size=2",
        ]
    )  # two batches of the bound
    result = train(cfg)
    metrics = result["metrics"]
    for key in ("train/mse_epoch", "train/vb_epoch", "val/bpd", "val/bpd_prior", "val/bpd_vb", "val/bpd_decoder"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["val/bpd"] == pytest.approx(
        metrics["val/bpd_prior"] + metrics["val/bpd_vb"] + metrics["val/bpd_decoder"]
    )
    m = result["evaluation"]
    assert m["nll_n"] == 3 and m["nll_variance"] == "learned" and m["nll_forward_passes"] == 150
    assert 0 < m["bpd"] < 30 and m["bpd_stderr"] >= 0
    assert sum(m["quartile_bpd"]) == pytest.approx(m["vb_bpd"] + m["decoder_bpd"], rel=1e-9)
    assert m["bpd"] == pytest.approx(m["prior_bpd"] + m["vb_bpd"] + m["decoder_bpd"], rel=1e-9)
    assert m["bpd_all_pixels"] == pytest.approx(m["bpd"] * 784 / 1024 + m["padding_bpd"], rel=1e-9)
    written = json.loads(next((result["run_dir"] / "evaluate").glob("step_*/metrics.json")).read_text())
    assert written["bpd"] == m["bpd"] and "variance='learned'" in m["sampler"]
    # the same images and seed give the same bound; a fixed variance is accepted for a learned-sigma checkpoint
    opts = end_of_run_options(cfg, result["last_ckpt"], tmp_path / "eval")
    assert evaluate(opts)["bpd"] == m["bpd"]
    opts = end_of_run_options(cfg, result["last_ckpt"], tmp_path / "eval2")
    opts.nll_variance = "fixed_large"
    other = evaluate(opts)
    assert other["nll_variance"] == "fixed_large" and other["bpd"] != m["bpd"]


@pytest.mark.slow  # longer than ~3 s on the slower 2-core kind: the full tier only
def test_importance_sampler_state_is_checkpointed_and_a_resume_is_bit_identical(
    tiny_train_overrides, tmp_path, monkeypatch
):
    """T = 4: the history is full after 5 steps of batch 8, so later steps draw from the importance distribution;
    4 epochs straight == 2 epochs + a resume for 2 more, and a resume that forgets the history differs."""
    over = [
        *tiny_train_overrides,
        "model.learn_sigma=true",
        "diffusion.loss=vlb",
        "diffusion.timestep_sampler=loss-second-moment",
        "schedule.timesteps=4",
        "callbacks.ema=null",
        "callbacks.fid.sampler.steps=2",
    ]
    straight = train(compose_train([*over, "trainer.max_epochs=4", f"run_dir={tmp_path / 's'}"]))
    first = train(compose_train([*over, "trainer.max_epochs=2", f"run_dir={tmp_path / 'r'}"]))
    mid = torch.load(first["last_ckpt"], map_location="cpu", weights_only=True)
    torch.save(mid, tmp_path / "mid.ckpt")
    resumed = train(
        compose_train(
            [*over, "trainer.max_epochs=4", f"run_dir={tmp_path / 'r'}", f"ckpt_path={tmp_path / 'mid.ckpt'}"]
        )
    )
    a = torch.load(straight["last_ckpt"], map_location="cpu", weights_only=True)
    b = torch.load(resumed["last_ckpt"], map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    assert 0 < int(mid["timestep_sampler"]["counts"].sum()) <= 32  # 4 steps of 8 losses, at most HISTORY per t
    assert bool((a["timestep_sampler"]["counts"] == HISTORY).all())  # warmed up: the last steps drew by importance
    torch.testing.assert_close(a["timestep_sampler"]["history"], b["timestep_sampler"]["history"], rtol=0, atol=0)
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    # the test can fail: a resume without the history draws other timesteps and ends elsewhere
    monkeypatch.setattr(DDPM, "on_load_checkpoint", lambda self, checkpoint: None)
    forgot = train(
        compose_train(
            [*over, "trainer.max_epochs=4", f"run_dir={tmp_path / 'f'}", f"ckpt_path={tmp_path / 'mid.ckpt'}"]
        )
    )
    c = torch.load(forgot["last_ckpt"], map_location="cpu", weights_only=True)
    assert any(not torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])


# ------------------------------------------------------------------------------------------------ configs
def test_the_iddpm_presets_compose_the_papers_settings():
    for name, loss, sigma, ts, variance in [
        ("iddpm", "hybrid", True, "uniform", "learned"),
        ("iddpm_simple", "simple", False, "uniform", "fixed_small"),
        ("iddpm_vlb", "vlb", True, "loss-second-moment", "learned"),
    ]:
        cfg = compose_train([f"experiment={name}", "data.root=x"])
        assert (cfg.diffusion.loss, cfg.model.learn_sigma, cfg.diffusion.timestep_sampler) == (loss, sigma, ts), name
        assert cfg.schedule.kind == "cosine" and cfg.sampler.variance == variance and cfg.sampler.steps == 100
        assert cfg.diffusion.vlb_weight == 0.001 and cfg.evaluate.nll is True and cfg.model.patch_size == 2


def test_a_group_sweep_composes_with_its_first_item_so_keys_below_it_are_known():
    cfg = compose_config("train", ["experiment=iddpm_simple,iddpm,iddpm_vlb", "trainer.max_time=00:00:05:00"])
    assert cfg.trainer.max_time == "00:00:05:00" and cfg.diffusion.loss == "simple"


# ------------------------------------------------------------------------------------------------ sampling
def test_ddpm_module_samples_with_the_learned_variance():
    model = DDPM(tiny_sigma_net(), NoiseSchedule(timesteps=20), sampler=DDPMSampler("learned", steps=5))
    out = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert out.x0.shape == (3, 1, 32, 32) and bool(torch.isfinite(out.x0).all())
    fixed = DDPM(
        ADMUNetEps(model_channels=32, channel_mult=[1], attn_resolutions=[]),
        NoiseSchedule(timesteps=20),
        sampler=DDPMSampler("learned", steps=5),
    )
    with pytest.raises(ValueError, match="needs a network with a variance output"):
        fixed.sample(2)
