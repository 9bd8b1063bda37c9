"""Every pixel conversion, sample pictures, and the one atomic file write.

Pixel conventions:

* the model works on ``float32`` in ``[-1, 1]``, channels first: ``(B, C, H, W)`` (MNIST: ``(B, 1, 32, 32)``);
* stored and exported pixels are ``uint8`` ``0..255`` (``samples.npz`` is channels last, ``(N, H, W, C)``);
* pictures for people (grids, trajectories, PNG files) are ``float32`` ``(3, H, W)`` in ``[0, 1]``.

:func:`to_model_range` and :func:`to_uint8` convert between the first two (``to_uint8(to_model_range(u)) == u``),
:func:`to_unit_range` to the third; :func:`nchw_to_nhwc` / :func:`nhwc_to_nchw` swap the channel axis.
:func:`atomic_write` writes a file through a temporary file in the same folder, so a kill never leaves half a file
under the final name. No Lightning here: torch and torchvision only.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Union

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

__all__ = [
    "to_model_range",
    "to_uint8",
    "to_unit_range",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "sample_grid",
    "trajectory_grid",
    "save_png",
    "as_model_input",
    "as_nchw",
    "atomic_write",
    "save_gif",
]

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------- pixel conversions


def to_model_range(uint8_batch: Tensor) -> Tensor:
    """Map ``uint8`` pixels ``0..255`` to ``float32`` in ``[-1, 1]`` as ``x / 255 * 2 - 1``.

    Works on any shape (a single ``(1, 32, 32)`` image or a ``(B, 1, 32, 32)`` batch) and keeps it; 0 maps to
    exactly ``-1.0`` and 255 to exactly ``1.0``.

    Raises:
        TypeError: if the input is not ``torch.uint8``.
    """
    if uint8_batch.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a torch.uint8 tensor, got {uint8_batch.dtype}")
    return uint8_batch.to(torch.float32) / 255 * 2 - 1


def to_uint8(x: Tensor) -> Tensor:
    """Inverse of :func:`to_model_range`: floats in ``[-1, 1]`` to ``uint8`` ``0..255``, same shape and device.

    Values outside ``[-1, 1]`` (e.g. raw sampler output) are clamped first, then ``(x + 1) / 2 * 255`` is rounded
    to the nearest integer (halves to even). ``to_uint8(to_model_range(u)) == u`` for every ``uint8`` tensor ``u``.
    """
    x = x.detach().to(torch.float32).clamp(-1.0, 1.0)
    return ((x + 1) / 2 * 255).round().to(torch.uint8)


def nchw_to_nhwc(x: Tensor) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, H, W, C)`` (channels last, the layout of ``samples.npz``), contiguous; any dtype."""
    if x.dim() != 4:
        raise ValueError(f"nchw_to_nhwc expects a 4-d (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    return x.permute(0, 2, 3, 1).contiguous()


def nhwc_to_nchw(x: Tensor) -> Tensor:
    """``(N, H, W, C)`` -> ``(N, C, H, W)`` (channels first, the model's layout), contiguous; any dtype."""
    if x.dim() != 4:
        raise ValueError(f"nhwc_to_nchw expects a 4-d (N, H, W, C) tensor, got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).contiguous()


def as_nchw(images: Tensor) -> Tensor:
    """``images`` as a tensor, ``(N, 32, 32, 1)`` permuted to ``(N, 1, 32, 32)``; other shapes and dtypes unchanged."""
    x = torch.as_tensor(images)
    if x.dim() == 4 and x.shape[1] != 1 and x.shape[-1] == 1:
        x = x.permute(0, 3, 1, 2)
    return x


def as_model_input(images: Tensor) -> Tensor:
    """uint8 ``(N, 1, 32, 32)`` or ``(N, 32, 32, 1)`` (0..255), or float ``(N, 1, 32, 32)`` in ``[-1, 1]`` ->
    float32 ``(N, 1, 32, 32)`` in ``[-1, 1]`` (the classifier's input).

    Raises:
        ValueError: another rank, shape or dtype.
    """
    images = as_nchw(images)
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D (N, 1, 32, 32) or (N, 32, 32, 1), got shape {tuple(images.shape)}")
    if tuple(images.shape[1:]) != (1, 32, 32):
        raise ValueError(f"images must be (N, 1, 32, 32) or (N, 32, 32, 1), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return to_model_range(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or float in [-1, 1], got {images.dtype}")
    return images.to(torch.float32)


# ----------------------------------------------------------------------------- pictures


def to_unit_range(x: Tensor) -> Tensor:
    """Map images from [-1, 1] to [0, 1] (clamped): any shape, returned as ``float32`` on the CPU."""
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


# ----------------------------------------------------------------------------- files


def atomic_write(path: PathLike, write_fn: Callable[[Path], object], fsync: bool = True) -> Path:
    """Write ``path`` all at once: ``write_fn(tmp)`` writes a temporary file, which then replaces ``path``.

    The temporary file is hidden in the same folder (``.<name>.tmp-<pid>-<random>``), so the final
    ``os.replace`` is a rename on one filesystem (atomic on POSIX): a reader or a kill sees the old file or the
    new one, never half of one. The parent folder is created. With ``fsync`` the data reaches the disk before the
    rename. If ``write_fn`` raises (or writes nothing), the temporary file is removed, the old file at ``path`` (if
    any) is left as it was, and the exception propagates.

    Args:
        path: the final file.
        write_fn: called once with the temporary path (a :class:`~pathlib.Path`); must create that file. Its name
            does not end like ``path``, so tell writers that guess the format from the suffix which one to use
            (``PIL.Image.save(tmp, format="PNG")``), and give ``np.savez`` an open file (it would append ``.npz``).
            Its return value is ignored.
        fsync: flush the temporary file to disk before the rename.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(os.fspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_fn(tmp)
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_write: the writer did not create {tmp} for {target}")
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


GIF_FRAME_MS = 100  #: duration of each trajectory frame
GIF_LAST_FRAME_MS = 1500  #: the final sample stays on screen longer


def save_gif(frames: list[Tensor], path: PathLike) -> Path:
    """An animated GIF, looping forever, with one frame per ``(n, C, H, W)`` tensor in [-1, 1] (the
    :func:`sample_grid` of the n samples, grey); consecutive pixel-identical frames are merged by Pillow. Written with
    :func:`atomic_write`; returns the path."""
    from PIL import Image

    images = [Image.fromarray((sample_grid(x)[0] * 255).round().to(torch.uint8).numpy(), mode="L") for x in frames]
    durations = [GIF_FRAME_MS] * (len(images) - 1) + [GIF_LAST_FRAME_MS]
    return atomic_write(
        path,
        lambda tmp: images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0
        ),
    )
