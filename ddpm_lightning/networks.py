"""Noise-prediction networks behind one contract: ``eps = net(x_t, t, y=None)``.

* ``x_t``: ``(N, C, H, W)`` noisy images (the data lives in [-1, 1]).
* ``t``: ``(N,)`` int64 timesteps in [0, T-1].
* ``y``: ``(N,)`` int64 class labels in [0, num_classes-1], or None (unconditional).
* returns eps, shaped like ``x_t``; or, for a network built with ``learn_sigma=True``, ``(N, 2C, H, W)``: eps and then
  v, the raw output of the learned variance (Nichol & Dhariwal 2021, arXiv:2102.09672, Eq. 15; see
  :func:`split_output`).

Adding a network is one config file in ``conf/model/`` plus, at most, a small adapter class here.
No Lightning import here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lightning.errors import ConfigError, check_bool, invalid, is_int

LEARN_SIGMA_ALLOWED = "must be true (2C outputs: eps and the learned variance) or false"


class EpsNetwork(nn.Module):
    """Base class of the adapters: ``num_classes`` is None for an unconditional network; ``learn_sigma`` True for one
    that outputs 2C channels (eps, then the variance output v); ``compile_in_training`` True when ``ddpm-train`` is to
    compile it (``model.compile=true``: :meth:`torch.nn.Module.compile` when fitting starts, so that the state dict
    keys stay those of the plain network; a checkpoint never compiles anything when it is loaded)."""

    num_classes: int | None = None
    learn_sigma: bool = False
    compile_in_training: bool = False

    def _check_labels(self, y: Tensor | None) -> None:
        if y is not None and self.num_classes is None:
            raise ConfigError(
                f"class labels were given to the unconditional network {type(self).__name__}: "
                "set model.num_classes to train a class-conditional model"
            )


class DiffUNetEps(EpsNetwork):
    """deepinv's ``DiffUNet`` (guided-diffusion's ADM UNet, ~93.6M parameters at 1 channel) as an eps network.

    ``DiffUNet.forward(x, t)`` defaults to ``type_t="noise_level"``: a denoiser of [0, 1] images that returns an
    image. This adapter always calls the timestep path (``type_t="timestep"``), whose output is the noise
    estimate eps for [-1, 1] images. DiffUNet has dropout 0.1: sample in eval mode.

    Args:
        in_channels: image channels C (1 for MNIST).
        large_model: deepinv's large variant (256 base channels).
        num_classes: must be None (deepinv's DiffUNet has no class embedding).
        learn_sigma: output 2C channels, eps and the variance output v (Improved DDPM's learned range).
        net: an existing ``DiffUNet`` to wrap (see :func:`as_eps_network`) instead of building one.
        compile: ``ddpm-train`` compiles the network when fitting starts (see :class:`EpsNetwork`).

    Raises:
        ConfigError: ``num_classes`` set.
    """

    def __init__(
        self,
        in_channels: int = 1,
        large_model: bool = False,
        num_classes: int | None = None,
        net: nn.Module | None = None,
        learn_sigma: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        from deepinv.models import DiffUNet

        self.compile_in_training = check_bool("compile", compile)

        if num_classes is not None:
            raise invalid(
                "num_classes", num_classes, "deepinv's DiffUNet is unconditional; use model=adm_small for labels"
            )
        self.learn_sigma = check_bool("learn_sigma", learn_sigma, LEARN_SIGMA_ALLOWED)
        self.out_channels = in_channels * (2 if self.learn_sigma else 1)
        # pretrained=None: random initialisation (the released weights are RGB 256x256 and cannot load at 1 channel).
        # deepinv turns out_channels=3 into 6 (its own learned sigma); forward keeps the first out_channels.
        self.net = (
            net
            if net is not None
            else DiffUNet(
                in_channels=in_channels, out_channels=self.out_channels, large_model=large_model, pretrained=None
            )
        )
        self.in_channels = in_channels
        # deepinv's timestep_embedding builds these frequencies on the CPU and copies them to the device at every
        # call (a blocking copy: a host sync per network call on a GPU); the same float32 values, kept on the device
        half = self.net.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        self.register_buffer("time_freqs", freqs, persistent=False)

    def timestep_embedding(self, t: Tensor) -> Tensor:
        """deepinv's ``timestep_embedding(t, model_channels)`` (guided-diffusion's sinusoidal embedding,
        ``[cos(t f), sin(t f)]`` with ``f_i = 10000^(-i / half)``), ``(N, model_channels)`` float32, from the
        frequencies kept on the device."""
        args = t[:, None].float() * self.time_freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.net.model_channels % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """deepinv's ``DiffUNet.forward(x_t, t, type_t="timestep")`` (its circular padding to a multiple of 32 and
        ``forward_diffusion``), with the timestep embedding of :meth:`timestep_embedding`; the first
        ``out_channels`` channels."""
        self._check_labels(y)
        net = self.net
        if x_t.shape[-2] >= 520 or x_t.shape[-1] >= 520:  # deepinv's patch path (not used at 32x32)
            return net(x_t, t, type_t="timestep")[:, : self.out_channels]
        pad = (-x_t.size(-1) % 32, 0, -x_t.size(-2) % 32, 0)
        x = F.pad(x_t, pad, mode="circular") if any(pad) else x_t
        emb = net.time_embed(self.timestep_embedding(t))
        h = x.type(net.dtype)
        skips = []
        for module in net.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = net.middle_block(h, emb)
        for module in net.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = module(h, emb)
        out = net.out(h.type(x.dtype))[..., pad[-2] :, pad[-4] :]
        return out[:, : self.out_channels]


class ADMUNetEps(EpsNetwork):
    """deepinv's ``ADMUNet`` (Dhariwal & Nichol 2021) used as a plain eps network through its raw UNet path.

    ``ADMUNet.forward`` applies EDM preconditioning to a noise level sigma; this adapter bypasses it and calls
    ``forward_unet(x_t, t)`` with the integer timestep as the noise label (sinusoidal embedding, as in DDPM).
    Class labels enter as one-hot vectors; an all-zero vector is the null label used for classifier-free guidance.

    Args:
        img_resolution: H = W of the images (32 for padded MNIST).
        in_channels: image channels C.
        model_channels: base channel count (a multiple of 32 because of GroupNorm(32)).
        channel_mult: per-resolution channel multipliers; len(channel_mult)-1 downsamplings.
        num_blocks: residual blocks per resolution.
        attn_resolutions: resolutions (e.g. [8]) with self-attention.
        dropout: dropout probability in the residual blocks.
        num_classes: None (unconditional) or the number of classes for conditioning.
        learn_sigma: output 2C channels, eps and the variance output v (Improved DDPM's learned range).
        patch_size: 1, or p >= 2 to run the UNet on ``(N, C*p*p, H/p, W/p)`` space-to-depth patches
            (``pixel_unshuffle``, as the patch size of DiT/U-ViT and the input downsampling of "simple diffusion",
            Hoogeboom et al. 2023, arXiv:2301.11093, Sec. 3) and ``pixel_shuffle`` the output back: about
            p*p times less compute at the same channel widths (4.5x faster training at p=2 on 2 CPU cores).
        net: an existing ``ADMUNet`` to wrap (see :func:`as_eps_network`; with ``num_classes`` = its label
            dimension and ``patch_size`` 1) instead of building one from the arguments above.
        compile: ``ddpm-train`` compiles the network when fitting starts (see :class:`EpsNetwork`).

    Raises:
        ConfigError: ``num_classes`` not null or >= 2; ``patch_size`` not a positive integer dividing
            ``img_resolution``.
    """

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 1,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_blocks: int = 1,
        attn_resolutions: Sequence[int] = (8,),
        dropout: float = 0.1,
        num_classes: int | None = None,
        patch_size: int = 1,
        net: nn.Module | None = None,
        learn_sigma: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        from deepinv.models import ADMUNet

        self.compile_in_training = check_bool("compile", compile)

        self.learn_sigma = check_bool("learn_sigma", learn_sigma, LEARN_SIGMA_ALLOWED)
        out_channels = in_channels * (2 if self.learn_sigma else 1)

        if num_classes is not None and (not is_int(num_classes) or num_classes < 2):
            raise invalid("num_classes", num_classes, "must be null or an integer >= 2")
        if not is_int(patch_size) or patch_size < 1 or img_resolution % patch_size:
            raise invalid(
                "patch_size", patch_size, f"must be a positive integer dividing img_resolution={img_resolution}"
            )
        self.patch_size = int(patch_size)
        self.net = (
            net
            if net is not None
            else ADMUNet(
                img_resolution=img_resolution // self.patch_size,
                in_channels=in_channels * self.patch_size**2,
                out_channels=out_channels * self.patch_size**2,
                label_dim=num_classes or 0,
                model_channels=model_channels,
                channel_mult=tuple(channel_mult),
                num_blocks=num_blocks,
                attn_resolutions=tuple(attn_resolutions),
                dropout=dropout,
                label_dropout=0,
                pretrained=None,
            )
        )
        self.net.train()  # deepinv's constructor leaves the network in eval mode
        self.num_classes = num_classes

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self._check_labels(y)
        labels = None
        if self.num_classes is not None:
            labels = one_hot_or_null(y, self.num_classes, x_t.shape[0], x_t.dtype, x_t.device)
        p = self.patch_size
        x = F.pixel_unshuffle(x_t, p) if p > 1 else x_t
        eps = self.net.forward_unet(x, t.to(x_t.dtype), class_labels=labels)
        return F.pixel_shuffle(eps, p) if p > 1 else eps


def one_hot_or_null(y: Tensor | None, num_classes: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(n, num_classes)`` one-hot rows of the labels ``y`` (``(n,)`` int64 in [0, num_classes-1]), with an all-zero
    row for ``y = -1`` (the null label of classifier-free guidance) and for ``y`` None.

    Built by one scatter into ``num_classes + 1`` columns, the null label going to the last one, which is then
    dropped: no boolean-mask indexing, whose output size depends on the data (a host sync on a GPU)."""
    if y is None:
        return torch.zeros(n, num_classes, dtype=dtype, device=device)
    column = torch.where(y >= 0, y, num_classes).unsqueeze(1)
    rows = torch.zeros(n, num_classes + 1, dtype=dtype, device=device).scatter_(1, column, 1.0)
    return rows[:, :num_classes]


def split_output(out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
    """``(eps, v)`` from a network output: ``out`` itself and None for C channels, its two halves for 2C.

    Raises:
        ValueError: another channel count.
    """
    if out.shape[1] == channels:
        return out, None
    if out.shape[1] == 2 * channels:
        eps, v = out.chunk(2, dim=1)
        return eps, v
    raise ValueError(f"the network returned {out.shape[1]} channels for {channels}-channel images (expected C or 2C)")


def as_eps_network(net: nn.Module) -> nn.Module:
    """The network in the eps contract ``eps = net(x_t, t, y=None)``: a raw deepinv ``DiffUNet`` or ``ADMUNet`` is
    wrapped in its adapter, so that it is called on its timestep/UNet path (eps for [-1, 1] images) and never on
    its default denoiser path (``DiffUNet.forward(x, t)`` means ``type_t="noise_level"``: an image from a [0, 1]
    noisy image, not eps). Any other module is returned unchanged.

    Raises:
        ConfigError: another deepinv denoiser (``DRUNet``, ...), which has no eps path.
    """
    if isinstance(net, EpsNetwork) or not type(net).__module__.startswith("deepinv"):
        return net
    from deepinv.models import ADMUNet, DiffUNet

    if isinstance(net, DiffUNet):
        return DiffUNetEps(in_channels=int(net.in_channels), net=net)
    if isinstance(net, ADMUNet):
        label = getattr(net, "map_label", None)
        return ADMUNetEps(num_classes=label.in_features if label is not None else None, net=net)
    raise ConfigError(
        f"net={type(net).__name__} is invalid: a deepinv denoiser without an eps path; "
        "use ddpm_lightning.networks.DiffUNetEps or ADMUNetEps (model=diffunet, model=adm_small)"
    )


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
