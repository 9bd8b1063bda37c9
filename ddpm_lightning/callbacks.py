"""Lightning callbacks: sample grids and denoising trajectories to TensorBoard and PNG files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from ddpm_lightning.errors import invalid
from ddpm_lightning.images import save_png, sample_grid, trajectory_grid
from ddpm_lightning.samplers import _Sampler


class SampleCallback(L.Callback):
    """Every ``every_n_epochs`` epochs and at the end of training, draw ``num_samples`` images with a fixed seed.

    Writes ``<dirpath>/epoch_XXX.png`` (a grid) and ``<dirpath>/trajectory_XXX.png`` (rows = samples,
    columns = x_t from pure noise to x0), and logs both as images ``samples`` and ``trajectory`` to TensorBoard.
    Runs on global rank zero only and touches no collective, so it cannot hang a DDP job.

    Args:
        dirpath: folder for the PNG files (created on first use).
        every_n_epochs: interval in epochs; 0 means only at the end of training.
        num_samples: images in the grid (>= 1).
        trajectory_samples: rows of the trajectory picture (<= num_samples; 0 turns it off).
        trajectory_frames: about this many x_t frames per row (start and end included).
        seed: seed of x_T and of the per-step noise, so that grids are comparable across epochs.
        sampler: overrides the module's sampler for these pictures (e.g. DDIM-50 to save time); None uses it.
    """

    def __init__(
        self,
        dirpath: str | Path = "samples",
        every_n_epochs: int = 1,
        num_samples: int = 64,
        trajectory_samples: int = 8,
        trajectory_frames: int = 10,
        seed: int = 1234,
        sampler: _Sampler | None = None,
    ) -> None:
        for key, value, low in [
            ("every_n_epochs", every_n_epochs, 0),
            ("num_samples", num_samples, 1),
            ("trajectory_samples", trajectory_samples, 0),
            ("trajectory_frames", trajectory_frames, 2),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise invalid(f"callbacks.samples.{key}", value, f"must be an integer >= {low}")
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.trajectory_samples = min(trajectory_samples, num_samples)
        self.trajectory_frames = trajectory_frames
        self.seed = seed
        self.sampler = sampler
        self.last_paths: list[Path] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer, pl_module, epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch - 1 if trainer.current_epoch > 0 else 0
        if not (self.dirpath / f"epoch_{epoch:03d}.png").exists():
            self._draw(trainer, pl_module, epoch)

    @rank_zero_only
    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        sampler = self.sampler or pl_module.sampler
        steps = len(sampler.timesteps(pl_module.schedule.num_timesteps))
        every = max(1, steps // (self.trajectory_frames - 1)) if self.trajectory_samples else None
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        out = pl_module.sample(self.num_samples, generator=generator, sampler=sampler, trajectory_every=every)
        grid = sample_grid(out.x0)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        paths = [save_png(grid, self.dirpath / f"epoch_{epoch:03d}.png")]
        traj: Tensor | None = None
        if self.trajectory_samples:
            traj = trajectory_grid([x[: self.trajectory_samples] for _, x in out.trajectory])
            paths.append(save_png(traj, self.dirpath / f"trajectory_{epoch:03d}.png"))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=trainer.global_step)
                if traj is not None:
                    logger.experiment.add_image("trajectory", traj, global_step=trainer.global_step)
        self.last_paths = paths
        rank_zero_info(f"[samples] epoch {epoch}: {', '.join(str(p) for p in paths)}")
