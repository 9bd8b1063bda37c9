"""The DDPM LightningModule: the training objective and the reverse process, wired to Lightning.

Training minimises, by default, L_simple (Ho et al. 2020, arXiv:2006.11239, Eq. 14 / Algorithm 1):
``E_{x0, t, eps} || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2`` with t uniform in
[0, T-1] (0-based) and eps ~ N(0, I), or the same MSE on the x0 or v target (``objective``,
:mod:`ddpm_lightning.objectives`); or L_hybrid / L_vlb with learned variances and importance-sampled timesteps
(Nichol & Dhariwal 2021, arXiv:2102.09672; the maths in :mod:`ddpm_lightning.losses` and
:mod:`ddpm_lightning.timestep_sampling`). Sampling delegates to :mod:`ddpm_lightning.samplers`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ddpm_lightning.errors import NonFiniteLossError, NonFiniteWeightsError, check_int, invalid, is_number
from ddpm_lightning.losses import Bound, check_loss, predict_x0, training_vb, variational_bound
from ddpm_lightning.networks import as_eps_network, split_output
from ddpm_lightning.objectives import check_objective, min_snr_weights, target, zero_terminal_snr
from ddpm_lightning.samplers import DDPMSampler, SampleOutput, Sampler
from ddpm_lightning.schedule import NoiseSchedule, check_variance, extract
from ddpm_lightning.timestep_sampling import make_timestep_sampler

TIMESTEP_SAMPLER_KEY = "timestep_sampler"  #: the checkpoint entry holding the importance sampler's loss history

NUM_QUARTILES = 4


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. seed, global step, rank)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def first_non_finite(named: Any) -> str | None:
    """The name of the first floating-point tensor in ``named`` (an iterable of ``(name, tensor)``) that holds a NaN
    or an infinity, or None when all are finite; non-float and empty tensors are skipped.

    Checked in one pass: the max-norm (``torch._foreach_norm`` with ord=inf, which is NaN or inf exactly when the
    tensor holds a NaN or an inf, and cannot overflow) of every tensor per device and dtype, then one sync. Only when
    that finds something are the tensors looked at one by one, for the name. (One sync per tensor, as before, cost
    8% of an adm_fast training step on 2 CPU cores: ``benchmarks/train_overhead.py``.)"""
    items, flags = finite_flags(named, torch.device("cpu"))
    if not flags or bool(torch.stack(flags).all()):
        return None
    return first_bad_name(items)


def finite_flags(named: Any, device: torch.device) -> tuple[list[tuple[str, Tensor]], list[Tensor]]:
    """``(items, flags)``: the floating-point, non-empty tensors of ``named`` (``(name, tensor)`` pairs) and, per device
    and dtype, a 0-dim bool tensor on ``device`` that is True when all of that group's tensors are finite (one
    ``torch._foreach_norm`` with ord=inf per group, see :func:`first_non_finite`). Nothing is read back: the caller
    reads the flags with whatever else it needs, in one sync."""
    items = [(n, v) for n, v in named if isinstance(v, Tensor) and v.is_floating_point() and v.numel() > 0]
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for _, value in items:
        groups.setdefault((value.device, value.dtype), []).append(value.detach())
    flags = [
        torch.isfinite(torch.stack(torch._foreach_norm(ts, ord=math.inf))).all().to(device, non_blocking=True)
        for ts in groups.values()
    ]
    return items, flags


def first_bad_name(items: list[tuple[str, Tensor]]) -> str | None:
    """The name of the first tensor of ``items`` that holds a NaN or an infinity (one sync per tensor: only for the
    message, once something was found)."""
    return next((name for name, value in items if not bool(torch.isfinite(value).all())), None)


class NonFiniteWatch:
    """The device-side record of non-finite training losses between two checks (:meth:`DDPM.check_finite`).

    Every step adds its loss with :meth:`watch`: a few kernels that keep, on the loss's device, the global step and
    the value of the first non-finite loss since the last check, and nothing is read back. The learning rate of each
    step (a host float) is kept on the host for the message.

    Attributes:
        start: the first global step not yet verified.
        last: the last global step watched (None before the first).
    """

    def __init__(self, start: int = 0) -> None:
        self.first_step: Tensor | None = None  # int64, 0-dim: the first step with a non-finite loss, -1 for none
        self.first_loss: Tensor | None = None  # float32, 0-dim: its loss
        self.lrs: dict[int, float] = {}
        self.start = start
        self.last: int | None = None

    def watch(self, loss: Tensor, step: int, lr: float) -> None:
        """Record step ``step``'s loss (no sync)."""
        loss = loss.detach().float()
        if self.first_step is None or self.first_step.device != loss.device:
            self.first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.first_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        new = ~torch.isfinite(loss) & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_loss = torch.where(new, loss, self.first_loss)
        self.lrs[step] = lr
        self.last = step

    @property
    def pending(self) -> bool:
        """True when a step was trained since the last check."""
        return self.last is not None and self.last >= self.start

    def verified(self, next_step: int) -> None:
        """Everything before ``next_step`` is verified: start a new window."""
        if self.first_step is not None:
            self.first_step.fill_(-1)
        self.lrs.clear()
        self.start = next_step
        self.last = None


def _optimizer_state_tensors(module: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, Tensor]]:
    """``("optimizer state exp_avg of net.x.weight", tensor)`` for every tensor in the optimizer's per-parameter
    state."""
    names = {id(p): n for n, p in module.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            yield f"optimizer state {key} of {names.get(id(param), '?')}", value


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode (dropout off) and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class DDPM(L.LightningModule):
    """A denoising diffusion probabilistic model: eps network + noise schedule + sampler.

    Args:
        net: eps network with the contract ``eps = net(x_t, t, y=None)`` (see :mod:`ddpm_lightning.networks`). A raw
            deepinv ``DiffUNet`` or ``ADMUNet`` is wrapped in its adapter
            (:func:`~ddpm_lightning.networks.as_eps_network`), so it is called on its eps path, not on its default
            denoiser path; another deepinv denoiser is refused.
        schedule: the :class:`~ddpm_lightning.schedule.NoiseSchedule` (T steps).
        optimizer: a callable ``params -> torch.optim.Optimizer`` (a Hydra ``_partial_`` target);
            None gives Adam(lr=1e-4), the paper's setting for 32x32 data.
        sampler: the reverse process used by :meth:`sample`; None gives DDPM ancestral sampling (Algorithm 2).
        seed: base seed of the per-step training noise and of the fixed validation noise.
        image_shape: ``(C, H, W)`` of one image, default ``(1, 32, 32)``.
        config: the resolved run configuration as plain containers, stored in the checkpoint so that a
            checkpoint can be sampled without the original config files.
        label_dropout: class-conditional networks only (``net.num_classes`` set): the probability of replacing a
            label by the null label during training, for classifier-free guidance (Ho & Salimans 2022).
        lr_scheduler: a callable ``optimizer -> LRScheduler`` (a Hydra ``_partial_`` target, e.g.
            ``conf/lr_scheduler/onecycle.yaml``) stepped after every optimizer step; None keeps the learning rate
            constant, as in the paper.
        min_snr_gamma: None trains on L_simple (uniform weights). A number gamma weights each sample's MSE by the
            Min-SNR-gamma weight of the objective (Hang et al. 2023, arXiv:2303.09556, Sec. 3.4), with
            ``SNR_t = abar_t / (1 - abar_t)``: eps ``min(SNR_t, gamma) / SNR_t``, x0 ``min(SNR_t, gamma)``, v
            ``min(SNR_t, gamma) / (SNR_t + 1)`` (:func:`~ddpm_lightning.objectives.min_snr_weights`): for eps the
            low-noise steps (SNR_t > gamma, t < ~120 for the linear schedule at gamma = 5) get less weight.
            ``val/loss`` stays the unweighted MSE. With ``loss="hybrid"`` it weights the MSE term only.
        loss: ``"simple"`` (L_simple), ``"hybrid"`` (L_simple + ``vlb_weight`` L_vlb, the mean stop-gradiented in the
            VLB term: Nichol & Dhariwal 2021, Eq. 16; needs a network with ``learn_sigma``) or ``"vlb"`` (L_vlb alone).
            The VLB term of a sample is ``T * L_t`` in bits/dim (:func:`~ddpm_lightning.losses.training_vb`), the
            one-sample estimate of L_vlb, so with T = 1000 and ``vlb_weight = 0.001`` L_hybrid adds L_t once.
            A fixed-variance network trained with ``vlb`` uses ``fixed_small``.
        vlb_weight: lambda of L_hybrid, a finite number > 0 (0.001 in the paper).
        timestep_sampler: ``"uniform"`` or ``"loss-second-moment"`` (importance sampling, Nichol & Dhariwal Sec. 3.3;
            :mod:`ddpm_lightning.timestep_sampling`), whose loss history is saved in checkpoints and, under DDP,
            updated with every rank's losses so that all ranks draw from the same distribution.
        objective: what the network predicts: ``"eps"`` (Ho et al.), ``"x0"`` or ``"v"`` (Salimans & Ho 2022); the MSE
            is on that target and every sampler and the bound convert the output with
            :func:`~ddpm_lightning.objectives.predict`. A zero-terminal-SNR schedule
            (``schedule.rescale_zero_terminal_snr``) needs ``v`` or ``x0``.

    Batches are ``(x0, y)`` or ``x0`` with x0 ``(N, C, H, W)`` float in [-1, 1] and y ``(N,)`` int64 labels
    (used only by a class-conditional network).

    Randomness: each training step reseeds the global RNG with ``derive_seed(seed, global_step, global_rank)``,
    so t, eps and dropout are a pure function of the step: a resumed run reproduces an uninterrupted one and
    DDP ranks draw different noise. Validation uses fixed t and eps per batch index, so ``val/loss`` is
    comparable across epochs and runs.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        sampler: Sampler | None = None,
        seed: int = 0,
        image_shape: tuple[int, int, int] = (1, 32, 32),
        config: dict[str, Any] | None = None,
        label_dropout: float = 0.1,
        lr_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
        min_snr_gamma: float | None = None,
        loss: str = "simple",
        vlb_weight: float = 0.001,
        timestep_sampler: str = "uniform",
        objective: str = "eps",
    ) -> None:
        super().__init__()
        self.objective = check_objective(objective, zero_terminal_snr(schedule.alphas_cumprod))
        if not is_number(label_dropout) or not 0 <= label_dropout < 1:
            raise invalid("label_dropout", label_dropout, "must be a number in [0, 1)")
        if min_snr_gamma is not None and (not is_number(min_snr_gamma) or not 0 < min_snr_gamma < math.inf):
            raise invalid("min_snr_gamma", min_snr_gamma, "must be null (L_simple) or a finite number > 0, e.g. 5")
        if not is_number(vlb_weight) or not 0 < vlb_weight < math.inf:
            raise invalid("vlb_weight", vlb_weight, "must be a finite number > 0 (0.001 in Improved DDPM)")
        net = as_eps_network(net)  # a raw deepinv DiffUNet / ADMUNet gets its adapter (never the denoiser path)
        self.learn_sigma = bool(getattr(net, "learn_sigma", False))
        self.loss = check_loss(loss, self.learn_sigma, min_snr_gamma)
        self.vlb_weight = float(vlb_weight)
        self.timestep_sampler = make_timestep_sampler(timestep_sampler, schedule.num_timesteps)
        # Plain containers only: OmegaConf objects would break torch.load(weights_only=True).
        self.save_hyperparameters({"config": config or {}, "seed": int(seed), "image_shape": list(image_shape)})
        self.net = net
        self.schedule = schedule
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.sampler = sampler if sampler is not None else DDPMSampler()
        self.seed = int(seed)
        self.image_shape = tuple(image_shape)
        self.num_classes: int | None = getattr(self.net, "num_classes", None)
        self.label_dropout = float(label_dropout)
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        self.val_loss = MeanMetric()
        self.val_loss_quartiles = nn.ModuleList(MeanMetric() for _ in range(NUM_QUARTILES))
        self._watch = NonFiniteWatch()  # the non-finite losses since the last check_finite

    # ----------------------------------------------------------------------------------------------- model
    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The network's output for int64 timesteps ``t`` in [0, T-1]: the prediction of the objective (eps_theta(x_t,
        t) by default), ``(N, C, H, W)``, or with ``learn_sigma`` ``(N, 2C, H, W)``, that then the variance output v
        (see :meth:`model_output`)."""
        return self.net(x_t, t, y)

    def model_output(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(out, v)``: the prediction of the objective (eps, x0 or v), ``(N, C, H, W)``, and the raw variance output v
        like it (``learn_sigma``; :func:`~ddpm_lightning.schedule.learned_log_variance`) or None."""
        return split_output(self.net(x_t, t, y), x_t.shape[1])

    @staticmethod
    def _split_batch(batch: Tensor | tuple | list) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    def _eps_loss(self, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None = None) -> Tensor:
        """Per-sample MSE of the objective's target (the eps-MSE for ``objective="eps"``), ``(N,)`` float32."""
        return self._losses(x0, t, noise, y, with_vb=False)[0]

    def _losses(
        self, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None, with_vb: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Per-sample ``(mse, vb)``, ``(N,)`` float32: the MSE between the output and the objective's target
        (:func:`~ddpm_lightning.objectives.target`) and, ``with_vb``, the VLB term of each sample's timestep in bits/dim
        (:func:`~ddpm_lightning.losses.training_vb`; its mean detached for L_hybrid)."""
        x_t = self.schedule.q_sample(x0, t, noise)
        out, v = self.model_output(x_t, t, y if self.num_classes is not None else None)
        alpha, sigma = (
            extract(b, t, x0) for b in (self.schedule.sqrt_alphas_cumprod, self.schedule.sqrt_one_minus_alphas_cumprod)
        )
        goal = target(self.objective, x0, noise, alpha, sigma)
        mse = F.mse_loss(out.float(), goal.float(), reduction="none").flatten(1).mean(1)
        if not with_vb:
            return mse, None
        x0_hat = predict_x0(self.schedule, x_t, t, out, self.objective)
        return mse, training_vb(self.schedule, x0, x_t, t, x0_hat, v, stop_grad_mean=self.loss == "hybrid")

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Tensor | tuple, batch_idx: int) -> Tensor:
        x0, y = self._split_batch(batch)
        torch.manual_seed(derive_seed(self.seed, "train", self.global_step, self.global_rank))
        t, weights = self.timestep_sampler.sample(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)
        if self.num_classes is not None and y is not None and self.label_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, -1), y)  # -1 = the null label
        mse, vb = self._losses(x0, t, noise, y, with_vb=self.loss != "simple")
        losses = mse
        if self.min_snr_gamma is not None:
            losses = losses * min_snr_weights(self.objective, self.schedule.alphas_cumprod, t, self.min_snr_gamma)
        T = self.schedule.num_timesteps
        if self.loss == "hybrid":
            losses = losses + self.vlb_weight * T * vb
        elif self.loss == "vlb":
            losses = T * vb
        loss = (losses * weights).mean()  # weights 1 / (T p_t): unbiased under importance sampling
        lr = self._lr()
        self._watch.watch(loss, self.global_step, lr)  # read at the next check_finite, not now (no sync)
        self._update_timestep_sampler(t, losses)
        size = x0.shape[0]
        # not prog_bar: Lightning would read it back every batch; ddpm_lightning.callbacks.ProgressBar reads it when
        # it redraws
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=size)
        if vb is not None:  # both as expectations over uniform t (importance-weighted)
            self.log("train/mse", (mse * weights).mean(), on_step=True, on_epoch=True, batch_size=size)
            self.log("train/vb", (vb * weights).mean() * T, on_step=True, on_epoch=True, batch_size=size)
        if self.lr_scheduler_factory is not None:  # a host tensor: a Python float would be copied to the device
            self.log("train/lr", torch.tensor(lr, dtype=torch.float32), on_step=True, on_epoch=False)
        return loss

    def _lr(self) -> float:
        """The first parameter group's learning rate (a host float), NaN outside a fit."""
        if self._trainer is not None and self.trainer.optimizers:
            return self.trainer.optimizers[0].param_groups[0]["lr"]
        return float("nan")

    def _update_timestep_sampler(self, t: Tensor, losses: Tensor) -> None:
        """Give the timestep sampler this step's per-sample losses, every rank's under DDP (gathered in rank order, so
        every rank holds the same history and draws from the same distribution)."""
        if not self.timestep_sampler.stateful:
            return
        t, losses = t.detach(), losses.detach().float()
        if self._trainer is not None and self.trainer.world_size > 1:  # one collective: (W, 2, B), in rank order
            both = self.all_gather(torch.stack([t.to(torch.float64), losses.to(torch.float64)]))
            t, losses = both[:, 0].flatten().long(), both[:, 1].flatten()
        self.timestep_sampler.update(t, losses)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Nothing non-finite is saved (:meth:`check_finite` first); the importance sampler's loss history goes into
        the checkpoint, so that a resumed run draws the timesteps an uninterrupted one would."""
        self.check_finite()
        if self.timestep_sampler.stateful:
            checkpoint[TIMESTEP_SAMPLER_KEY] = self.timestep_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(TIMESTEP_SAMPLER_KEY)
        if state and self.timestep_sampler.stateful:
            self.timestep_sampler.load_state_dict(state)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step; an update that torch refuses as beyond float32 (e.g. lr=1e39) is a one-line error.

        Raises:
            NonFiniteWeightsError: naming the global step and the lr, before any callback (EMA, checkpoints) sees
                the step, so the newest checkpoint stays the last good one. Weights that become non-finite are
                found by :meth:`check_finite`.
        """
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps the torch optimizer
        lr = inner.param_groups[0]["lr"]
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        except RuntimeError as err:  # torch refuses an update scalar (lr / bias correction) beyond float32's range
            if "without overflow" not in str(err):
                raise
            raise NonFiniteWeightsError(
                f"training stopped: the optimizer step at global step {self.global_step} overflowed float32 "
                f"(lr={lr:g}); nothing from this step was saved, the newest checkpoint is the last good one. "
                "Try a lower optimizer.lr"
            ) from None

    # ------------------------------------------------------------------------------------------- non-finite guard
    #: Steps between two checks when ``trainer.log_every_n_steps`` is 0.
    CHECK_EVERY_DEFAULT = 50

    def on_fit_start(self) -> None:
        """``model.compile=true``: compile the network in place (:meth:`torch.nn.Module.compile`, so the state dict
        keys stay unprefixed and checkpoints load either way). Here, after the EMA callback copied the module in its
        ``setup`` (a copy of a compiled module would call the original's forward)."""
        if getattr(self.net, "compile_in_training", False) and getattr(self.net, "_compiled_call_impl", None) is None:
            self.net.compile()

    def on_train_start(self) -> None:
        self._watch = NonFiniteWatch(self.global_step)  # a resumed run starts verified (its checkpoint was)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``trainer.log_every_n_steps`` optimizer steps (the steps Lightning logs at): :meth:`check_finite`."""
        every = self.trainer.log_every_n_steps or self.CHECK_EVERY_DEFAULT
        if self.global_step % every == 0:
            self.check_finite()

    def on_validation_start(self) -> None:
        self.check_finite()  # before the EMA weights are swapped in (EMA.on_validation_epoch_start comes after)

    def on_train_end(self) -> None:
        self.check_finite()

    def check_finite(self) -> None:
        """Read the non-finite record of the steps since the last check, and check every parameter and optimizer
        state, in one sync; nothing to do when no step was trained since the last check.

        Called every ``trainer.log_every_n_steps`` steps and before anything reads the weights: a checkpoint save
        (:meth:`on_save_checkpoint`), the EMA swap for validation, sampling (the picture, FID and bits/dim
        callbacks), the end of fit. A skipped step of a GradScaler (16-mixed: inf gradients, no update) leaves the
        weights finite and is not an error.

        Raises:
            NonFiniteLossError: naming the global step of the first non-finite loss since the last check, its value
                and its lr.
            NonFiniteWeightsError: naming the first non-finite parameter or optimizer state and the steps since the
                last check (``at global step N`` when that is one step, ``between global steps A and B``).
        """
        watch = self._watch
        if not watch.pending:
            return
        named: list[tuple[str, Tensor]] = list(self.net.named_parameters(prefix="net"))
        inner = None
        if self._trainer is not None and self.trainer.optimizers:
            inner = self.trainer.optimizers[0]
            named += list(_optimizer_state_tensors(self, inner))
        device = watch.first_step.device if watch.first_step is not None else self.device
        items, flags = finite_flags(named, device)
        loss_record = [watch.first_step.double(), watch.first_loss.double()] if watch.first_step is not None else []
        values = torch.stack([*loss_record, *(f.double() for f in flags)]).tolist() if loss_record or flags else []
        first_step, first_loss = (int(values[0]), values[1]) if loss_record else (-1, 0.0)
        start, last = watch.start, watch.last
        if first_step >= 0:
            raise NonFiniteLossError(
                f"training stopped: non-finite loss {first_loss} at global step {first_step} "
                f"(lr={watch.lrs.get(first_step, float('nan')):g}); the newest checkpoint is the last good one. "
                "Try a lower optimizer.lr or trainer.gradient_clip_val"
            )
        if not all(values[len(loss_record) :]):
            bad = first_bad_name(items)
            one = start == last
            when = f"step at global step {last}" if one else f"steps between global steps {start} and {last}"
            raise NonFiniteWeightsError(
                f"training stopped: {bad} is non-finite after the optimizer {when} (the loss was finite; "
                f"lr={watch.lrs.get(last, float('nan')):g}); nothing from {'this step' if one else 'these steps'} "
                "was saved, the newest checkpoint is the last good one. Try a lower optimizer.lr or "
                "trainer.gradient_clip_val"
            )
        watch.verified(last + 1)

    def validation_step(self, batch: Tensor | tuple, batch_idx: int) -> None:
        x0, y = self._split_batch(batch)
        g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, "val", batch_idx, self.global_rank))
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(device=x0.device, dtype=x0.dtype)
        losses = self._eps_loss(x0, t, noise, y)
        self.val_loss.update(losses)
        quartile = (t * NUM_QUARTILES) // self.schedule.num_timesteps
        for q, metric in enumerate(self.val_loss_quartiles):
            mask = quartile == q
            if mask.any():
                metric.update(losses[mask])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=False)
        self.val_loss.reset()
        for q, metric in enumerate(self.val_loss_quartiles):
            # compute() is a collective under DDP: every rank calls it for every quartile, even one whose own images
            # drew no t there (deciding by the local update_called once left the ranks in different collectives);
            # a quartile no rank saw is NaN and not logged.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                value = metric.compute()
            if bool(torch.isfinite(value)):
                self.log(f"val/loss_q{q}", value)
            metric.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        params = self.net.parameters()
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(params, lr=1e-4)
        else:
            optimizer = self.optimizer_factory(params=params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        generator: torch.Generator | None = None,
        sampler: Sampler | None = None,
        trajectory_every: int | None = None,
        noise: Tensor | None = None,
        progress: bool = False,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> SampleOutput:
        """Draw samples with the reverse process, in eval mode (the previous mode is restored).

        Args:
            num_samples: N >= 1.
            generator: a ``torch.Generator`` on this module's device for x_T and the per-step noise; None uses
                the global RNG.
            sampler: overrides the module's sampler (e.g. a ``DDIMSampler``).
            trajectory_every: also return x_t every this many sampler steps.
            noise: x_T, ``(N, C, H, W)``; drawn from ``generator`` when None.
            progress: tqdm bar over the steps.
            class_labels: ``(N,)`` int64 in [0, num_classes-1] for a class-conditional network; None gives the
                digits 0, 1, ..., num_classes-1 in turn. Refused by an unconditional network.
            guidance_scale: classifier-free guidance (Ho & Salimans 2022, Eq. 6 with w = guidance_scale - 1):
                ``eps = eps_null + guidance_scale * (eps_cond - eps_null)``; 1 = plain conditional, 0 = unconditional.
                Must be 1 for an unconditional network.

        Returns:
            :class:`~ddpm_lightning.samplers.SampleOutput`: ``x0`` of shape ``(N, C, H, W)`` in [-1, 1] and the
            optional trajectory of ``(t, x_t)`` pairs.

        Raises:
            ConfigError: ``num_samples`` not a positive integer; labels or guidance for an unconditional network;
                labels out of range.
        """
        check_int("num_samples", num_samples, 1, "must be a positive integer")
        eps_fn = self._guided_eps_fn(num_samples, class_labels, guidance_scale)
        if noise is None:
            noise = torch.randn((num_samples, *self.image_shape), generator=generator, device=self.device)
        sampler = sampler or self.sampler
        with eval_mode(self.net):
            return sampler(
                eps_fn,
                self.schedule,
                noise,
                generator=generator,
                trajectory_every=trajectory_every,
                progress=progress,
                objective=self.objective,
            )

    @torch.no_grad()
    def variational_bound(
        self,
        x0: Tensor,
        labels: Tensor | None = None,
        variance: str | None = None,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
        progress: bool = False,
    ) -> Bound:
        """The variational bound of images under this model, in eval mode
        (:func:`~ddpm_lightning.losses.variational_bound`, Ho et al. 2020 Eq. 5; T network calls per image; the mean
        with x0_hat clipped to [-1, 1], as the samplers).

        Args:
            x0: ``(N, C, H, W)`` images on the 8-bit grid of [-1, 1], on this module's device.
            labels: ``(N,)`` int64 true classes for a class-conditional network (the bound of p(x | y)); else None.
            variance: p_theta's variance: ``fixed_small``, ``fixed_large`` or ``learned``; None = ``learned`` for a
                network with ``learn_sigma``, else ``fixed_small``.
            generator: draws the eps of every term; mask: the real pixels (``losses.digit_mask()``), None = all.

        Raises:
            ConfigError: naming ``variance`` (unknown, or ``learned`` without a variance output); ``class_label`` when
                labels do not fit the network.
        """
        variance = check_variance(variance or ("learned" if self.learn_sigma else "fixed_small"), self.learn_sigma)
        check_conditioning(self.num_classes, labels, 1.0)
        y = labels.to(self.device) if (labels is not None and self.num_classes is not None) else None
        with eval_mode(self.net):
            return variational_bound(
                lambda x, t: self.model_output(x, t, y),
                self.schedule,
                x0,
                variance=variance,
                generator=generator,
                mask=mask,
                progress=progress,
                objective=self.objective,
            )

    def _guided_eps_fn(
        self, num_samples: int, class_labels: Tensor | None, guidance_scale: float
    ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]:
        """The function the sampler calls, ``(out, v)`` of x_t and t: plain, conditional, or classifier-free guided (the
        guidance combination is on the output, which for x0 and v is the same as on eps: eps_hat is affine in it)."""
        check_conditioning(self.num_classes, class_labels, guidance_scale)
        channels = self.image_shape[0]
        if self.num_classes is None:
            return lambda x, t: split_output(self.net(x, t), channels)
        if class_labels is None:
            class_labels = torch.arange(num_samples) % self.num_classes
        y = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        if y.numel() == 1:
            y = y.expand(num_samples)
        if y.shape != (num_samples,):
            raise invalid(
                "class_label", _label_repr(class_labels), f"must be one label or {num_samples} (one per sample)"
            )
        if guidance_scale == 1.0:
            return lambda x, t: split_output(self.net(x, t, y), channels)
        null = torch.full_like(y, -1)

        def guided(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
            out_cond, out_null = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
            (eps_cond, v), (eps_null, _) = split_output(out_cond, channels), split_output(out_null, channels)
            # the variance output of the conditional model, as GLIDE does (Nichol et al. 2022)
            return eps_null + guidance_scale * (eps_cond - eps_null), v

        return guided


def _label_repr(labels: Any) -> Any:
    return labels.tolist() if isinstance(labels, Tensor) else labels


def check_guidance_scale(guidance_scale: Any) -> None:
    """The classifier-free guidance scale must be a finite number (1 = no guidance).

    Raises:
        ConfigError: naming ``guidance_scale``.
    """
    if not is_number(guidance_scale) or not math.isfinite(guidance_scale):
        raise invalid("guidance_scale", guidance_scale, "must be a finite number (1 = no guidance)")


def check_conditioning(num_classes: int | None, class_labels: Any, guidance_scale: float) -> None:
    """Class labels and the guidance scale against a network's ``num_classes`` (None = unconditional).

    Args:
        num_classes: the network's class count, or None.
        class_labels: None, an int, or int64 labels (any shape), each in [0, num_classes-1].
        guidance_scale: a finite number; must be 1 for an unconditional network.

    Raises:
        ConfigError: naming ``class_label`` or ``guidance_scale``.
    """
    check_guidance_scale(guidance_scale)
    if num_classes is None:
        if class_labels is not None:
            raise invalid(
                "class_label", _label_repr(class_labels), "the model is unconditional (model.num_classes=null)"
            )
        if guidance_scale != 1.0:
            raise invalid(
                "guidance_scale", guidance_scale, "the model is unconditional (model.num_classes=null); use 1.0"
            )
    elif class_labels is not None:
        y = torch.as_tensor(class_labels)
        if y.is_floating_point() or bool(((y < 0) | (y >= num_classes)).any()):
            raise invalid(
                "class_label", _label_repr(class_labels), f"must be in [0, {num_classes - 1}] (one integer per sample)"
            )
