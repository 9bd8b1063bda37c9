"""Lightning callbacks: the EMA of the weights, sample grids / denoising trajectories (TensorBoard and PNG), the FID
during training, and the run's row in TensorBoard's HParams tab."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar, WeightAveraging
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ddpm_lightning.classifier import load_classifier, missing_classifier_error
from ddpm_lightning.errors import check_int, invalid, is_number
from ddpm_lightning.hparams import HP_METRICS, log_final_metrics, write_session_start
from ddpm_lightning.images import sample_grid, save_png, trajectory_grid
from ddpm_lightning.mnist import load_mnist_split
from ddpm_lightning.module import check_guidance_scale
from ddpm_lightning.samplers import Sampler
from ddpm_lightning.sampling import draw_samples


def ema_decay(decay: float, num_averaged: int, warmup: bool = True) -> float:
    """Decay of the n-th EMA update: ``min(decay, (1 + n) / (10 + n))`` with warm-up, else ``decay``.

    The warm-up (as in TensorFlow's ExponentialMovingAverage with ``num_updates``) lets the average follow the
    fast-changing early weights instead of remembering the random initialisation for ~1/(1-decay) steps.
    """
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged)) if warmup else decay


def check_finite(pl_module: L.LightningModule) -> None:
    """The module's non-finite guard (:meth:`ddpm_lightning.module.DDPM.check_finite`) before something reads its
    weights; a module without one passes."""
    check = getattr(pl_module, "check_finite", None)
    if callable(check):
        check()


class EMA(WeightAveraging):
    """Exponential moving average of the network weights, on Lightning's ``WeightAveraging`` callback.

    ``ema <- d * ema + (1 - d) * weights`` after every ``update_every_n_steps`` optimizer steps, with ``d`` from
    :func:`ema_decay`. Buffers (the noise schedule) are never averaged. Lightning swaps the EMA weights in for
    validation (so ``val/loss`` is the EMA's), stores them in the checkpoint's ``state_dict`` with the raw weights
    in ``current_model_state``, restores both on resume (training continues from the raw weights), and copies the
    EMA into the module when training ends. :class:`SampleCallback` and ``ddpm-sample`` sample with the EMA.

    The update is one ``torch._foreach_lerp_`` over all parameters (``ema + (1 - d) (weights - ema)``), with ``d``
    computed on the host from a Python count of the updates: nothing is read back from the device (torch's
    ``AveragedModel.update_parameters`` reads its ``n_averaged`` twice and, with a per-tensor ``avg_fn``, once per
    parameter tensor). The count is written into ``AveragedModel.n_averaged`` when a checkpoint is saved, so the
    checkpoint layout is Lightning's (``averaging_state["n_averaged"]``), and read back once on resume. The swaps for
    validation and the final copy are foreach copies of the parameters; buffers stay the module's own (they are
    copied into the average only for the checkpoint's ``state_dict``).

    Args:
        decay: in [0, 1); 0.9999 as in Ho et al. 2020 (Appendix B).
        warmup: use the warm-up schedule of :func:`ema_decay`.
        update_every_n_steps: update interval in optimizer steps (>= 1).

    Raises:
        ConfigError: ``decay`` or ``update_every_n_steps`` out of range (``build`` adds ``callbacks.ema.``).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1) -> None:
        if not is_number(decay) or not 0.0 <= decay < 1.0:
            raise invalid("decay", decay, "must be a number in [0, 1)")
        check_int("update_every_n_steps", update_every_n_steps, 1)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.update_every_n_steps = update_every_n_steps
        super().__init__(use_buffers=False, avg_fn=self._average)
        self.num_averaged = 0  #: updates so far, on the host (AveragedModel.n_averaged mirrors it in checkpoints)
        self._params: tuple[list[Tensor], list[Tensor]] | None = None

    def _average(self, averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        """One tensor's update as torch's ``avg_fn`` (the foreach update in :meth:`update` does the same to all)."""
        d = ema_decay(self.decay, int(num_averaged), self.warmup)
        return averaged + (current - averaged) * (1.0 - d)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.num_averaged, self._params = 0, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # setup() built the average before the strategy moved the module to its device: follow it there.
        if self._average_model is not None:
            self._average_model.to(pl_module.device)
        self._params = None

    def _pairs(self, pl_module: L.LightningModule) -> tuple[list[Tensor], list[Tensor]]:
        """``(average's parameters, module's parameters)``, in the same order (cached: the Parameter objects stay)."""
        if self._params is None:
            assert self._average_model is not None
            self._params = (list(self._average_model.module.parameters()), list(pl_module.parameters()))
        return self._params

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule) -> None:
        """One EMA update: a copy of the weights the first time, then ``_foreach_lerp_`` with weight ``1 - d``."""
        averaged, current = self._pairs(pl_module)
        if self.num_averaged == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(self.decay, self.num_averaged, self.warmup))
        self.num_averaged += 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step_idx = trainer.global_step - 1  # as WeightAveraging: the zero-based index of the last optimizer step
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self.update(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_finite(pl_module)  # before the average becomes the module's weights
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None:
            self._average_model.n_averaged.fill_(self.num_averaged)
            with torch.no_grad():
                for b_avg, b_cur in zip(self._average_model.module.buffers(), pl_module.buffers(), strict=True):
                    b_avg.copy_(b_cur)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:  # Lightning loaded averaging_state (or left 0: a checkpoint without EMA)
            self.num_averaged = int(self._average_model.n_averaged)  # one read, at resume

    @torch.no_grad()
    def _swap_models(self, pl_module: L.LightningModule) -> None:
        averaged, current = self._pairs(pl_module)
        saved = torch._foreach_mul(averaged, 1.0)
        torch._foreach_copy_(averaged, current)
        torch._foreach_copy_(current, saved)

    @torch.no_grad()
    def _copy_average_to_current(self, pl_module: L.LightningModule) -> None:
        averaged, current = self._pairs(pl_module)
        torch._foreach_copy_(current, averaged)

    @property
    def average_module(self) -> L.LightningModule | None:
        """The averaged copy of the LightningModule (None outside fit)."""
        return self._average_model.module if self._average_model is not None else None


def ema_module(trainer: L.Trainer) -> L.LightningModule | None:
    """The EMA copy of the module when an :class:`EMA` callback is active, else None."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA) and callback.average_module is not None:
            return callback.average_module
    return None


def fast_sampler() -> Sampler:
    """The per-epoch pictures' default sampler: SDE-DPM-Solver++(2M), 20 steps, trailing spacing, clipped x0
    (``conf/sampler/sde_dpmpp.yaml``; Lu et al. 2022; FID 9.27 against 9.75 for DDIM-100 in docs/solvers.md): 20
    network calls per picture instead of DDPM's 1,000."""
    from ddpm_lightning.samplers import DPMSolverSampler

    return DPMSolverSampler(
        steps=20, order=2, timestep_spacing="trailing", clip_denoised=True, algorithm="sde-dpmsolver++"
    )


def sample_across_ranks(
    trainer: L.Trainer,
    module: L.LightningModule,
    num_samples: int,
    seed: int,
    sampler: Sampler | None,
    trajectory_frames: int | None = None,
    trajectory_rows: int = 0,
    guidance_scale: float = 1.0,
) -> tuple[Tensor, list[Tensor]]:
    """Draw ``num_samples`` images with every DDP rank drawing a share, so that no rank waits alone in a collective
    while another computes (and a SIGTERM reaches every rank while it runs Python code, see
    :mod:`ddpm_lightning.signals`).

    Each of the W ranks draws ``ceil(num_samples / W)`` samples in one batch with
    :func:`~ddpm_lightning.sampling.draw_samples` (the one sampling loop), seeded with ``seed + 7919 * rank``; one
    ``all_gather`` collects them on every rank. With one process this is exactly
    ``draw_samples(module, num_samples, batch_size=num_samples, seed=seed)``. Every rank must call it (it is a
    collective under DDP). A class-conditional module draws the classes in turn (sample j of a rank's share gets
    class ``j % num_classes``), with classifier-free guidance at ``guidance_scale`` (1 = none).

    Returns:
        ``(x0, frames)``: x0 ``(num_samples, C, H, W)`` in [-1, 1] on the CPU, in rank order; ``frames`` the trajectory
        of the first ``trajectory_rows`` samples of each rank (a list of ``(W * rows, C, H, W)``, empty without
        ``trajectory_frames``).
    """
    world, rank = trainer.world_size, trainer.global_rank
    share = -(-num_samples // world)
    drawn = draw_samples(
        module,
        share,
        sampler=sampler,
        batch_size=share,
        seed=seed + 7919 * rank,
        guidance_scale=guidance_scale,
        trajectory_frames=trajectory_frames,
        trajectory_rows=trajectory_rows,
    )
    x0 = drawn.x0.to(module.device)
    frames = torch.stack(drawn.frames).to(module.device) if drawn.frames else None  # (F, rows, C, H, W)
    if world > 1:
        x0 = trainer.strategy.all_gather(x0).flatten(0, 1)  # (W, share, ...) -> (W * share, ...)
        if frames is not None:
            frames = trainer.strategy.all_gather(frames).transpose(0, 1).flatten(1, 2)  # (F, W * rows, ...)
    return x0[:num_samples].cpu(), ([f.cpu() for f in frames] if frames is not None else [])


class SampleCallback(L.Callback):
    """Every ``every_n_epochs`` epochs and at the end of training, draw ``num_samples`` images with a fixed seed.

    Writes ``<dirpath>/epoch_XXX.png`` (a grid) and ``<dirpath>/trajectory_XXX.png`` (rows = samples,
    columns = x_t from pure noise to x0), and logs both as images ``samples`` and ``trajectory`` to TensorBoard.
    A class-conditional model's grid has ``num_classes`` columns, so that each row reads 0, 1, ..., 9.
    Samples come from the EMA weights when an :class:`EMA` callback is active, else from the raw weights.
    Under DDP every rank draws a share of the samples (:func:`sample_across_ranks`), so no rank idles in a collective
    while another computes; global rank zero writes the files and the TensorBoard images.

    Args:
        dirpath: folder for the PNG files (created on first use).
        every_n_epochs: interval in epochs; 0 means only at the end of training.
        num_samples: images in the grid (>= 1).
        trajectory_samples: rows of the trajectory picture (<= num_samples; 0 turns it off).
        trajectory_frames: about this many x_t frames per row (start and end included).
        seed: seed of x_T and of the per-step noise, so that grids are comparable across epochs.
        sampler: the sampler of these pictures: ``"fast"`` (the default: :func:`fast_sampler`, SDE-DPM-Solver++(2M) at
            20 steps), a :class:`~ddpm_lightning.samplers.Sampler` (e.g. DDIM-50), or None for the module's own sampler
            (the run's ``sampler``: DDPM-1000 by default).
        guidance_scale: class-conditional models: the classifier-free guidance scale of the pictures (Ho & Salimans
            2022; 1 = plain conditional, 0 = unconditional). Must be 1 for an unconditional model (checked by
            ``ddpm-train`` before training).
    """

    def __init__(
        self,
        dirpath: str | Path = "samples",
        every_n_epochs: int = 1,
        num_samples: int = 64,
        trajectory_samples: int = 8,
        trajectory_frames: int = 10,
        seed: int = 1234,
        sampler: Sampler | str | None = "fast",
        guidance_scale: float = 1.0,
    ) -> None:
        check_guidance_scale(guidance_scale)
        if isinstance(sampler, str):
            if sampler != "fast":
                raise invalid(
                    "sampler",
                    sampler,
                    "must be 'fast' (SDE-DPM-Solver++(2M), 20 steps), null (the run's "
                    "sampler) or a sampler node with a _target_",
                )
            sampler = fast_sampler()
        for key, value, low in [
            ("every_n_epochs", every_n_epochs, 0),
            ("num_samples", num_samples, 1),
            ("trajectory_samples", trajectory_samples, 0),
            ("trajectory_frames", trajectory_frames, 2),
        ]:
            check_int(key, value, low)
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.trajectory_samples = min(trajectory_samples, num_samples)
        self.trajectory_frames = trajectory_frames
        self.seed = seed
        self.sampler = sampler
        self.guidance_scale = float(guidance_scale)
        self.last_paths: list[Path] = []
        self._drawn_epoch: int | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer, pl_module, epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # decided from the loop's state, the same on every rank (not from files another node may not see)
        epoch = trainer.current_epoch - 1 if trainer.current_epoch > 0 else 0
        if self._drawn_epoch != epoch:
            self._draw(trainer, pl_module, epoch)

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        check_finite(pl_module)
        sampler = self.sampler or pl_module.sampler
        module = ema_module(trainer) or pl_module
        rank_zero_info(
            f"[samples] epoch {epoch}: drawing {self.num_samples} samples with {sampler!r}"
            + (f" on {trainer.world_size} ranks" if trainer.world_size > 1 else "")
        )
        x0, frames = sample_across_ranks(
            trainer,
            module,
            self.num_samples,
            self.seed,
            sampler,
            self.trajectory_frames if self.trajectory_samples else None,
            self.trajectory_samples,
            self.guidance_scale,
        )
        self._drawn_epoch = epoch
        if not trainer.is_global_zero:
            return
        grid = sample_grid(x0, nrow=getattr(module, "num_classes", None))  # conditional: one row per 0..9
        self.dirpath.mkdir(parents=True, exist_ok=True)
        paths = [save_png(grid, self.dirpath / f"epoch_{epoch:03d}.png")]
        traj: Tensor | None = None
        if self.trajectory_samples:
            traj = trajectory_grid([x[: self.trajectory_samples] for x in frames])
            paths.append(save_png(traj, self.dirpath / f"trajectory_{epoch:03d}.png"))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=trainer.global_step)
                if traj is not None:
                    logger.experiment.add_image("trajectory", traj, global_step=trainer.global_step)
        self.last_paths = paths
        rank_zero_info(f"[samples] epoch {epoch}: {', '.join(str(p) for p in paths)}")


class FIDCallback(L.Callback):
    """Every ``every_n_epochs`` epochs, a quick classifier FID of ``num_samples`` samples against the 10,000 MNIST
    test images, logged as ``val/fid`` (usable as ``callbacks.best.monitor=val/fid``).

    It runs at the end of the training epoch with the EMA weights (when EMA is on) and a fixed seed; under DDP every
    rank draws a share of the samples (:func:`sample_across_ranks`) and global rank zero computes and logs the FID
    (other ranks log nothing: with DDP use it for reporting, not as the checkpoint monitor). To keep the best
    checkpoint by FID: ``callbacks.best.monitor=val/fid callbacks.best.save_on_train_epoch_end=true`` with the same
    interval (``callbacks.best.every_n_epochs``). The classifier and the
    test statistics are loaded once, in ``setup``, so a missing or corrupt classifier stops the run before training.

    Args:
        every_n_epochs: 0 turns the callback off (the default); N >= 1 runs it after every N-th epoch.
        num_samples: samples per FID (>= 2; a few hundred gives a usable trend, not a publishable number).
        sampler: the reverse process (default DDIM-20 for speed); None uses the module's sampler.
        classifier_path: None = the packaged reference classifier
            (:func:`ddpm_lightning.metrics.reference_classifier_path`); or a file written by ``ddpm-train-classifier``.
        seed: seed of the samples, the same every time so that epochs are comparable.

    Raises:
        ConfigError: bad settings, or (in setup) no classifier file.
    """

    def __init__(
        self,
        every_n_epochs: int = 0,
        num_samples: int = 256,
        sampler: Sampler | None = None,
        classifier_path: str | None = None,
        seed: int = 4321,
    ) -> None:
        for key, value, low in [("every_n_epochs", every_n_epochs, 0), ("num_samples", num_samples, 2)]:
            check_int(key, value, low)
        if every_n_epochs and classifier_path is not None and not Path(classifier_path).expanduser().is_file():
            raise missing_classifier_error(Path(classifier_path).expanduser())
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.sampler = sampler
        self.classifier_path = classifier_path
        self.seed = seed
        self._classifier = None
        self._test_stats = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.every_n_epochs or self._classifier is not None:
            return
        from ddpm_lightning.metrics import classifier_outputs, gaussian_stats

        self._classifier, _ = load_classifier(self.classifier_path)
        test_images, _ = load_mnist_split(trainer.datamodule.root, train=False)
        features, _ = classifier_outputs(test_images, self._classifier)
        self._test_stats = gaussian_stats(features)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self.every_n_epochs or (epoch + 1) % self.every_n_epochs:
            return
        check_finite(pl_module)
        module = ema_module(trainer) or pl_module
        x0, _ = sample_across_ranks(trainer, module, self.num_samples, self.seed, self.sampler)
        if trainer.is_global_zero:
            from ddpm_lightning.metrics import classifier_outputs, frechet_distance, gaussian_stats

            features, _ = classifier_outputs(x0, self._classifier)
            fid = frechet_distance(*gaussian_stats(features), *self._test_stats)
            pl_module.log("val/fid", fid, rank_zero_only=True)


class BitsPerDimCallback(L.Callback):
    """Every ``every_n_epochs`` epochs, the variational bound in bits/dim (:mod:`ddpm_lightning.losses`) of the first
    ``num_images`` validation images, logged as ``val/bpd`` (over the 784 real pixels) with ``val/bpd_prior``,
    ``val/bpd_vb`` and ``val/bpd_decoder``.

    The same images and eps draws every time (``seed``), with the EMA weights when EMA is on, so epochs compare. Each
    image costs T network calls (1,000 for the default schedule: ~1.3 s per image for model=adm_fast on 2 CPU cores).
    Under DDP every rank bounds a share of the images and one ``all_gather`` collects them, so every rank logs the
    same value (usable as ``callbacks.best.monitor=val/bpd``).

    Args:
        every_n_epochs: 0 turns the callback off (the default); N >= 1 runs it after every N-th training epoch.
        num_images: validation images in the estimate, 1 .. ``data.val_size``.
        seed: seed of the eps draws.

    Raises:
        ConfigError: bad settings; ``num_images`` above the validation images (:meth:`check_datamodule`).
    """

    def __init__(self, every_n_epochs: int = 0, num_images: int = 16, seed: int = 2468) -> None:
        for key, value, low in [
            ("every_n_epochs", every_n_epochs, 0),
            ("num_images", num_images, 1),
            ("seed", seed, 0),
        ]:
            check_int(key, value, low)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed

    def check_datamodule(self, datamodule: L.LightningDataModule) -> None:
        """Before training (``ddpm-train`` calls it once the data is set up): ``num_images`` must not exceed the
        validation images.

        Raises:
            ConfigError: naming ``num_images``.
        """
        available = getattr(datamodule, "val_images", None)
        if self.every_n_epochs and available is not None and self.num_images > available.shape[0]:
            raise invalid(
                "num_images", self.num_images, f"must be <= data.val_size={available.shape[0]} (the validation images)"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        from ddpm_lightning.images import to_model_range
        from ddpm_lightning.losses import Bound, digit_mask

        check_finite(pl_module)
        module = ema_module(trainer) or pl_module
        world, rank = trainer.world_size, trainer.global_rank
        share = -(-self.num_images // world)
        index = torch.arange(rank * share, (rank + 1) * share) % self.num_images  # equal shares for all_gather
        data = trainer.datamodule
        x0 = to_model_range(data.val_images[index]).to(module.device)
        labels = data.val_labels[index] if getattr(module, "num_classes", None) is not None else None
        generator = torch.Generator(device=module.device).manual_seed(self.seed + rank)
        bound = module.variational_bound(x0, labels=labels, generator=generator, mask=digit_mask())
        parts = [bound.prior, bound.terms, bound.padding]
        if world > 1:
            parts = [trainer.strategy.all_gather(p.to(module.device)).flatten(0, 1).cpu() for p in parts]
        n = self.num_images
        whole = Bound(
            parts[0][:n], parts[1][:n], parts[2][:n], bound.num_dims, bound.num_real_dims, bound.variance
        ).summary()
        for name, key in [
            ("val/bpd", "bpd"),
            ("val/bpd_prior", "prior_bpd"),
            ("val/bpd_vb", "vb_bpd"),
            ("val/bpd_decoder", "decoder_bpd"),
        ]:
            pl_module.log(name, whole[key], sync_dist=False)


def tensorboard_writers(trainer: L.Trainer) -> list:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer`` on global rank zero (empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class HParamsSession(L.Callback):
    """Writes the run's hyperparameters to TensorBoard's HParams plugin when fitting starts, with the metric columns
    ``hp/val_loss``, ``hp/fid``, ... (see :mod:`ddpm_lightning.hparams`); :meth:`log_final` writes their values when
    the run ends. Global rank zero only, no collective.

    Args:
        params: flat ``{name: bool | int | float | str}`` from :func:`ddpm_lightning.hparams.run_hparams`.
    """

    def __init__(self, params: Mapping[str, bool | int | float | str]) -> None:
        self.params = dict(params)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for writer in tensorboard_writers(trainer):
            write_session_start(writer, self.params, HP_METRICS)

    @staticmethod
    def log_final(trainer: L.Trainer, values: Mapping[str, float]) -> None:
        """Write ``values`` (e.g. ``{"hp/fid": 9.1, "eval/fid": 9.1}``) as scalars at the last global step."""
        for writer in tensorboard_writers(trainer):
            log_final_metrics(writer, values, trainer.global_step)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, redrawn every ``refresh_rate`` optimizer steps (the steps at which the non-finite check
    runs and Lightning logs, ``trainer.log_every_n_steps``, when left at None) and at the end of an epoch. The
    training loss is read from the device only then: logged with ``prog_bar=True`` Lightning would read it back at
    every batch, a host sync per step on a GPU.

    Args:
        refresh_rate: optimizer steps between redraws; None = ``trainer.log_every_n_steps``.
    """

    def __init__(self, refresh_rate: int | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate or 1)
        self._every = refresh_rate

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._refresh_rate = self._every or trainer.log_every_n_steps or 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, n = self.train_progress_bar, batch_idx + 1
        if bar is not None and self.is_enabled and (trainer.global_step % self.refresh_rate == 0 or n == bar.total):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            _update_n(bar, n)  # one redraw with the new step and loss (a log file gets each bar line once)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        for key in ("train/loss_step", "train/loss_epoch"):
            value = trainer.callback_metrics.get(key)
            if isinstance(value, Tensor):
                metrics[key] = float(value)  # the one read, when the bar is redrawn
        return metrics
