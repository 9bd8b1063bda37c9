"""The LightningModule and the network adapters: L_simple, eval-mode sampling, the DiffUNet eps path."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.module import DDPM, derive_seed
from ddpm_lightning.networks import ADMUNetEps, DiffUNetEps
from ddpm_lightning.objectives import min_snr_weights
from ddpm_lightning.samplers import DDIMSampler
from ddpm_lightning.schedule import NoiseSchedule


def tiny_net(**kw) -> ADMUNetEps:
    return ADMUNetEps(model_channels=32, channel_mult=(1,), num_blocks=1, attn_resolutions=(), **kw)


@pytest.fixture(scope="module")
def diffunet() -> DiffUNetEps:
    torch.manual_seed(0)
    net = DiffUNetEps().eval()
    with torch.no_grad():  # guided-diffusion zero-initialises output convs: give them weights so outputs depend on t
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    return net


def test_diffunet_adapter_returns_eps_from_the_timestep_path(diffunet):
    """DiffUNet's default forward (type_t='noise_level') is an image denoiser; the adapter must not use it."""
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        eps = diffunet(x, t)
        direct = diffunet.net.forward_diffusion(x, t)[:, :1]
        denoised = diffunet.net(x, t)  # deepinv's default: type_t="noise_level"
    assert eps.shape == (2, 1, 32, 32)
    torch.testing.assert_close(eps, direct)
    assert (eps - denoised).abs().max() > 1e-3
    # the timestep matters: the same x at another t gives another eps
    with torch.no_grad():
        other = diffunet(x, torch.tensor([500, 500]))
    assert (eps - other).abs().max() > 1e-4


def test_diffunet_is_the_paper_size(diffunet):
    assert sum(p.numel() for p in diffunet.parameters()) == 93_555_841


def test_unconditional_network_refuses_labels():
    with pytest.raises(ConfigError, match="model.num_classes"):
        tiny_net()(torch.zeros(1, 1, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_training_step_is_l_simple_with_uniform_0_based_timesteps():
    """Ho et al. Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), loss = ||eps - eps_theta(q_sample(x0, t, eps), t)||^2."""
    torch.manual_seed(0)
    model = DDPM(tiny_net(dropout=0.0), NoiseSchedule(timesteps=1000), seed=3)
    x0 = torch.rand(6, 1, 32, 32) * 2 - 1
    loss = model.training_step((x0, torch.zeros(6, dtype=torch.long)), 0)
    torch.manual_seed(derive_seed(3, "train", 0, 0))
    t = torch.randint(0, 1000, (6,))
    eps = torch.randn_like(x0)
    abar = model.schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()).float()
    expected = ((model.net(x_t, t) - eps) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_min_snr_weights_golden_values():
    """Hang et al. 2023, Sec. 3.4, eps-prediction: w_t = min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t).
    Golden values from the linear schedule written out in float64 by hand."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    w = min_snr_weights("eps", NoiseSchedule(timesteps=1000).alphas_cumprod, torch.tensor([0, 1, 500, 999]), 5.0)
    assert w.dtype == torch.float32
    # t=0: abar = 1 - 1e-4, SNR = 9999 -> w = 5 / 9999; t=1: abar = (1 - 1e-4)(1 - beta_1)
    b1 = 1e-4 + (0.02 - 1e-4) / 999
    abar1 = (1 - 1e-4) * (1 - b1)
    expected = [5 / 9999, 5 * (1 - abar1) / abar1, 1.0, 1.0]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    # exactly 1 where SNR <= gamma, < 1 where SNR > gamma
    snr = abar / (1 - abar)
    w_all = min_snr_weights("eps", abar, torch.arange(1000), 5.0)
    assert bool((w_all[snr <= 5] == 1).all()) and bool((w_all[snr > 5] < 1).all()) and int((snr > 5).sum()) > 50


def test_training_step_with_min_snr_gamma_weights_each_sample():
    torch.manual_seed(0)
    net = tiny_net(dropout=0.0)
    plain = DDPM(net, NoiseSchedule(timesteps=1000), seed=3)
    weighted = DDPM(net, NoiseSchedule(timesteps=1000), seed=3, min_snr_gamma=5.0)
    x0 = torch.rand(6, 1, 32, 32) * 2 - 1
    batch = (x0, torch.zeros(6, dtype=torch.long))
    torch.manual_seed(derive_seed(3, "train", 0, 0))
    t = torch.randint(0, 1000, (6,))
    eps = torch.randn_like(x0)
    per_sample = plain._eps_loss(x0, t, eps)
    w = min_snr_weights("eps", plain.schedule.alphas_cumprod, t, 5.0)
    torch.testing.assert_close(weighted.training_step(batch, 0), (w * per_sample).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(plain.training_step(batch, 0), per_sample.mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma", [0, -1, float("inf"), "five"])
def test_bad_min_snr_gamma_is_one_line(gamma):
    with pytest.raises(ConfigError, match=rf"^min_snr_gamma={gamma!r} is invalid"):
        DDPM(tiny_net(), NoiseSchedule(timesteps=10), min_snr_gamma=gamma)


def test_training_timesteps_cover_0_to_T_minus_1():
    seen = set()
    for step in range(40):
        torch.manual_seed(derive_seed(0, "train", step, 0))
        seen.update(torch.randint(0, 10, (64,)).tolist())
    assert seen == set(range(10))


def test_sample_runs_in_eval_mode_and_restores_train_mode():
    model = DDPM(tiny_net(dropout=0.5), NoiseSchedule(timesteps=20), sampler=DDIMSampler(steps=5))
    model.train()
    modes = []
    original = model.net.forward

    def spy(*args, **kwargs):
        modes.append(model.net.training)
        return original(*args, **kwargs)

    model.net.forward = spy
    out = model.sample(3, generator=torch.Generator().manual_seed(0), trajectory_every=2)
    assert modes and not any(modes)  # dropout off while sampling
    assert model.net.training  # restored
    assert out.x0.shape == (3, 1, 32, 32) and out.x0.min() >= -1 and out.x0.max() <= 1
    assert [t for t, _ in out.trajectory] == [16, 8, 0, -1]  # leading spacing of 5 steps over T=20: 16,12,8,4,0
    again = model.sample(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.x0, again.x0)  # eval mode + fixed seed: reproducible


@pytest.mark.parametrize("num_samples", [0, -2, 1.5, True])
def test_sample_rejects_bad_num_samples(num_samples):
    model = DDPM(tiny_net(), NoiseSchedule(timesteps=10))
    with pytest.raises(ConfigError, match="num_samples"):
        model.sample(num_samples)


def test_beta_end_0_2_trains_and_samples_finite():
    """abar_999 ~ 2e-47 underflows float32, yet the loss, the gradients and the samples stay finite."""
    torch.manual_seed(0)
    model = DDPM(tiny_net(), NoiseSchedule(beta_end=0.2))
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    loss = model.training_step(x0, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for sampler in [DDIMSampler(steps=10, clip_denoised=False), DDIMSampler(steps=10)]:
        assert torch.isfinite(model.sample(2, sampler=sampler).x0).all()


def test_class_conditional_training_drops_labels_and_guidance_mixes_two_passes():
    torch.manual_seed(0)
    net = tiny_net(num_classes=10)
    model = DDPM(net, NoiseSchedule(timesteps=20), sampler=DDIMSampler(steps=4), label_dropout=0.5)
    seen = []
    original = net.forward

    def spy(x, t, y=None):
        seen.append(None if y is None else y.clone())
        return original(x, t, y)

    net.forward = spy
    x0 = torch.rand(64, 1, 32, 32) * 2 - 1
    y = torch.arange(64) % 10
    model.training_step((x0, y), 0)
    dropped = (seen[-1] == -1).float().mean().item()
    assert 0.3 < dropped < 0.7  # label dropout 0.5 -> about half null labels
    kept = seen[-1] != -1
    assert torch.equal(seen[-1][kept], y[kept])
    # guidance: eps = eps_null + s * (eps_cond - eps_null), evaluated in one batch of 2N
    seen.clear()
    x = torch.randn(3, 1, 32, 32)
    t = torch.tensor([5, 5, 5])
    labels = torch.tensor([1, 2, 3])
    fn = model._guided_eps_fn(3, labels, 3.0)
    with torch.no_grad():
        guided, v = fn(x, t)
        assert v is None
        cond, null = original(x, t, labels), original(x, t, torch.full_like(labels, -1))
    torch.testing.assert_close(guided, null + 3.0 * (cond - null), rtol=1e-4, atol=1e-5)
    assert torch.equal(seen[-1], torch.tensor([1, 2, 3, -1, -1, -1]))
    out = model.sample(4, class_labels=torch.tensor(7), guidance_scale=2.0)
    assert out.x0.shape == (4, 1, 32, 32)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"class_labels": torch.tensor([1])}, "class_label"), ({"guidance_scale": 3.0}, "guidance_scale")],
)
def test_conditional_options_on_an_unconditional_model_are_refused(kwargs, key):
    model = DDPM(tiny_net(), NoiseSchedule(timesteps=10))
    with pytest.raises(ConfigError, match=f"{key}.*unconditional"):
        model.sample(1, **kwargs)


def test_conditional_labels_out_of_range_are_refused():
    model = DDPM(tiny_net(num_classes=10), NoiseSchedule(timesteps=10))
    with pytest.raises(ConfigError, match="class_label"):
        model.sample(2, class_labels=torch.tensor([3, 10]))


def test_diffunet_refuses_num_classes():
    with pytest.raises(ConfigError, match="^num_classes=10 is invalid"):
        DiffUNetEps(num_classes=10)


def test_patch_size_2_runs_the_unet_on_space_to_depth_patches(monkeypatch):
    """model.patch_size=2: the inner UNet sees (N, 4, 16, 16) = pixel_unshuffle(x_t, 2); its output is
    pixel_shuffled back to eps at (N, 1, 32, 32), so output pixel (i, j) is channel 2*(i%2)+(j%2) of patch
    (i//2, j//2)."""
    net = tiny_net(patch_size=2, dropout=0.0)
    seen = []

    def fake_unet(x, noise_labels, class_labels=None):
        seen.append(x.shape)
        return x * 10  # a pixel-wise map: after the round trip, eps must be 10 * x_t pixel for pixel

    monkeypatch.setattr(net.net, "forward_unet", fake_unet)
    x = torch.randn(3, 1, 32, 32)
    eps = net(x, torch.tensor([0, 500, 999]))
    assert seen == [torch.Size([3, 4, 16, 16])]
    torch.testing.assert_close(eps, x * 10, rtol=0, atol=0)


def test_patch_size_2_network_trains_end_to_end():
    torch.manual_seed(0)
    net = tiny_net(patch_size=2, dropout=0.0)
    x = torch.randn(2, 1, 32, 32)
    eps = net(x, torch.tensor([3, 900]))
    assert eps.shape == (2, 1, 32, 32)
    eps.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("patch_size", [0, 3, 2.5, "two"])
def test_bad_patch_size_is_one_line(patch_size):
    with pytest.raises(
        ConfigError, match=rf"^patch_size={patch_size!r} is invalid: must be a positive integer dividing"
    ):
        tiny_net(patch_size=patch_size)


def test_a_raw_deepinv_diffunet_handed_to_ddpm_is_wrapped_and_never_takes_the_denoiser_path(diffunet):
    """The seed's way of building the model, DDPM(net=deepinv.models.DiffUNet(...)), must train eps, not images."""
    raw = diffunet.net  # a plain deepinv DiffUNet with non-zero output weights
    model = DDPM(net=raw, schedule=NoiseSchedule())
    assert isinstance(model.net, DiffUNetEps) and model.net.net is raw
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        eps = model(x, t)
        torch.testing.assert_close(eps, raw.forward_diffusion(x, t)[:, :1])
        assert (eps - raw(x, t)).abs().max() > 1e-3  # not deepinv's default type_t="noise_level" output


def test_a_raw_deepinv_admunet_is_wrapped_with_its_label_embedding():
    from deepinv.models import ADMUNet

    raw = ADMUNet(
        img_resolution=32,
        in_channels=1,
        out_channels=1,
        model_channels=32,
        channel_mult=(1,),
        num_blocks=1,
        attn_resolutions=(),
        label_dim=10,
        dropout=0.0,
        pretrained=None,
    )
    model = DDPM(net=raw, schedule=NoiseSchedule())
    assert isinstance(model.net, ADMUNetEps) and model.net.net is raw and model.num_classes == 10
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([5, 900]), torch.tensor([3, -1])
    one_hot = torch.zeros(2, 10)
    one_hot[0, 3] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), raw.forward_unet(x, t.float(), class_labels=one_hot))


def test_another_deepinv_denoiser_is_refused_in_one_line():
    from deepinv.models import TVDenoiser

    with pytest.raises(ConfigError, match=r"^net=TVDenoiser is invalid: a deepinv denoiser without an eps path"):
        DDPM(net=TVDenoiser(), schedule=NoiseSchedule())


def test_first_non_finite_names_the_first_bad_tensor_and_never_flags_a_large_finite_one():
    from ddpm_lightning.module import first_non_finite

    big = torch.full((3, 3), 3e38)  # its 2-norm overflows float32; its max-norm does not
    ok = [
        ("a", big),
        ("b", torch.tensor(2.0)),
        ("c", torch.zeros(0)),
        ("d", torch.tensor([1, 2])),
        ("e", torch.randn(4, dtype=torch.float64)),
        ("f", "not a tensor"),
    ]
    assert first_non_finite(ok) is None
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(5, 5)
        x[3, 1] = bad_value
        assert first_non_finite([*ok, ("x", x), ("y", torch.tensor(float("nan")))]) == "x"
    assert first_non_finite([*ok, ("y", torch.tensor(float("nan"), dtype=torch.float64))]) == "y"
    assert first_non_finite([]) is None


def test_class_labels_become_one_hot_rows_without_a_mask_index():
    """one_hot_or_null: the old boolean-mask construction's values (null label -1 = a zero row), built by one scatter,
    with no host read."""
    import torch.nn.functional as F

    from ddpm_lightning.networks import one_hot_or_null
    from ddpm_lightning.sync_census import SyncCensus

    y = torch.tensor([3, -1, 0, 9, -1, 9])
    expected = torch.zeros(6, 10)
    keep = y >= 0
    expected[keep] = F.one_hot(y[keep], 10).float()
    with SyncCensus() as census:
        rows = one_hot_or_null(y, 10, 6, torch.float32, y.device)
        none = one_hot_or_null(None, 10, 6, torch.float32, y.device)
    assert census.count() == 0, census.summary()
    assert torch.equal(rows, expected) and torch.equal(none, torch.zeros(6, 10))
