"""Pictures of samples: grids and denoising trajectories as ``(3, H, W)`` float tensors in [0, 1] and PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image


def to_unit_range(x: Tensor) -> Tensor:
    """Map images from [-1, 1] to [0, 1] (clamped)."""
    return ((x.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def sample_grid(x0: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """A square-ish grid of ``(N, C, H, W)`` samples in [-1, 1]; returns ``(3, H', W')`` in [0, 1]."""
    nrow = nrow or max(1, math.ceil(math.sqrt(x0.shape[0])))
    return make_grid(to_unit_range(x0), nrow=nrow, padding=padding, pad_value=1.0)


def trajectory_grid(frames: list[Tensor], padding: int = 2) -> Tensor:
    """Rows = samples, columns = frames (x_T ... x0). ``frames``: list of ``(n, C, H, W)`` in [-1, 1]."""
    stacked = torch.stack([to_unit_range(f) for f in frames], dim=1)  # (n, F, C, H, W)
    n, f = stacked.shape[:2]
    return make_grid(stacked.flatten(0, 1), nrow=f, padding=padding, pad_value=1.0)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a ``(C, H, W)`` image in [0, 1] as PNG, creating the parent folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path
