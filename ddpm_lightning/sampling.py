"""Drawing samples from a DDPM outside the training loop: the one batched sampling loop (:func:`draw_samples`, used by
``ddpm-sample``, the end-of-run evaluation, the sample-grid callback and the FID callback), sampling a checkpoint
(:func:`sample_checkpoint`) and writing what ``ddpm-sample`` writes (:func:`write_samples`).

Reproducibility: batch i draws x_T and the per-step noise from a ``torch.Generator`` on the model's device seeded
with ``seed + i``, so the same weights, sampler, seed, batch size and device give the same samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm_lightning.checkpoint import ddpm_from_checkpoint, has_ema, load_checkpoint
from ddpm_lightning.config import at_key, build, sampler_node
from ddpm_lightning.errors import invalid
from ddpm_lightning.images import (
    atomic_write,
    sample_grid,
    save_gif,
    save_png,
    to_model_range,
    to_uint8,
    trajectory_grid,
)
from ddpm_lightning.module import check_conditioning
from ddpm_lightning.samplers import Sampler

SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
TRAJECTORY_PNG = "trajectory.png"
TRAJECTORY_GIF = "trajectory.gif"
GRID_MAX = 64  #: samples shown in grid.png
TRAJECTORY_ROWS = 8  #: samples shown in trajectory.png / trajectory.gif


@dataclass
class Drawn:
    """Samples drawn by :func:`draw_samples`.

    Attributes:
        x0: ``(N, C, H, W)`` float32 in [-1, 1], on the CPU.
        labels: ``(N,)`` int64 class of each sample (class-conditional models), else None.
        frames: the denoising trajectory of the first rows: a list of ``(rows, C, H, W)`` float32 in [-1, 1] from
            pure noise to x0 (empty when not asked for).
        num_steps: sampler steps per sample.
        seconds: wall time of the sampling (device synchronised).
    """

    x0: Tensor
    labels: Tensor | None
    frames: list[Tensor] = field(default_factory=list)
    num_steps: int = 0
    seconds: float = 0.0


def resolve_device(device: object) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other strings must name a usable torch device.

    Raises:
        ConfigError: naming ``device``.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise invalid("device", device, "must be auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise invalid("device", device, "CUDA is not available here; use device=cpu or device=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise invalid("device", device, f"only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise invalid("device", device, "must be auto, cpu, cuda or cuda:<index>")
    return dev


def draw_samples(
    ddpm: Any,
    num_samples: int,
    sampler: Sampler | None = None,
    batch_size: int = 256,
    seed: int = 0,
    class_label: int | None = None,
    guidance_scale: float = 1.0,
    trajectory_frames: int | None = None,
    trajectory_rows: int = TRAJECTORY_ROWS,
    progress: bool = False,
) -> Drawn:
    """Draw ``num_samples`` images from a :class:`~ddpm_lightning.module.DDPM` in batches (eval mode, no grad).

    Args:
        ddpm: the :class:`~ddpm_lightning.module.DDPM` (its device is used; its sampler when ``sampler`` is None).
        num_samples: N >= 1.
        sampler: the reverse process, or None for the model's own.
        batch_size: images per forward pass; batch i is seeded with ``seed + i``.
        seed: base seed.
        class_label: class-conditional models: one class for every sample, or None for the classes in turn
            (sample j gets class ``j % num_classes``).
        guidance_scale: classifier-free guidance scale (1 = none).
        trajectory_frames: about this many x_t frames per trajectory row (start and end included), or None.
        trajectory_rows: rows of the trajectory (the first samples).
        progress: tqdm bars over the batches and steps.

    Raises:
        ConfigError: from :meth:`DDPM.sample` (labels or guidance that the model cannot take).
    """
    from tqdm.auto import tqdm

    sampler = sampler or ddpm.sampler
    num_steps = len(sampler.timesteps(ddpm.schedule.num_timesteps))
    every = max(1, num_steps // (trajectory_frames - 1)) if trajectory_frames else None
    num_classes = getattr(ddpm, "num_classes", None)
    chunks, label_chunks, traj_chunks, rows = [], [], [], 0
    batches = range(math.ceil(num_samples / batch_size))
    start = time.perf_counter()
    for i in tqdm(batches, desc="batches", unit="batch", dynamic_ncols=True, disable=not progress):
        size = min(batch_size, num_samples - i * batch_size)
        generator = torch.Generator(device=ddpm.device).manual_seed(seed + i)
        labels = None
        if num_classes is not None:
            first = i * batch_size
            labels = (
                torch.full((size,), class_label)
                if class_label is not None
                else torch.arange(first, first + size) % num_classes
            )
            label_chunks.append(labels)
        want = min(trajectory_rows - rows, size) if every is not None else 0
        out = ddpm.sample(
            size,
            generator=generator,
            sampler=sampler,
            trajectory_every=every if want > 0 else None,
            progress=progress,
            class_labels=labels,
            guidance_scale=guidance_scale,
        )
        chunks.append(out.x0.float().cpu())
        if want > 0:
            traj_chunks.append([x[:want] for _, x in out.trajectory])
            rows += want
    if ddpm.device.type == "cuda":
        torch.cuda.synchronize(ddpm.device)
    frames = [torch.cat([batch[f] for batch in traj_chunks]) for f in range(len(traj_chunks[0]))] if traj_chunks else []
    return Drawn(
        torch.cat(chunks),
        torch.cat(label_chunks) if label_chunks else None,
        frames,
        num_steps,
        time.perf_counter() - start,
    )


@dataclass
class CheckpointSampler:
    """A checkpoint read and checked for sampling, before its network is built (:func:`open_checkpoint`)."""

    path: Path
    ckpt: dict[str, Any]
    sampler: Sampler
    sampler_source: str


def build_sampler(requested: Any, stored: Any, num_timesteps: int, learn_sigma: bool = False) -> tuple[Sampler, str]:
    """The sampler a checkpoint is sampled with: the requested ``sampler`` node merged with the stored one (see
    :func:`~ddpm_lightning.config.sampler_node`), built and checked against a schedule of ``num_timesteps`` steps and
    a network that learns its variance or not (``learn_sigma``).

    Returns:
        ``(sampler, source)``, e.g. ``(DDIMSampler(steps=20, ...), "the checkpoint's sampler, with steps=20")``.

    Raises:
        ConfigError: naming ``sampler.<key>``.
    """
    with at_key("sampler"):
        node, source = sampler_node(requested, stored)
    built = build(node, key="sampler")  # any failure to build is one line naming sampler
    with at_key("sampler"):
        built.check(num_timesteps, learn_sigma)
    return built, source


def learn_sigma_of(config: Any) -> bool:
    """Whether a stored run config's network outputs a variance (``model.learn_sigma``; absent before it existed)."""
    return (config.get("model") or {}).get("learn_sigma") is True


def open_checkpoint(
    path: str | Path, sampler: Any, class_label: int | None = None, guidance_scale: float = 1.0
) -> CheckpointSampler:
    """Read a ``ddpm-train`` checkpoint and build the sampler to use with it, checking everything that needs
    neither the weights nor the network: the requested ``sampler`` node (see
    :func:`~ddpm_lightning.config.sampler_node`) against the checkpoint's schedule, and the conditioning against its
    model.

    Raises:
        ConfigError: one line naming ``ckpt_path``, ``sampler.<key>``, ``class_label`` or ``guidance_scale``.
    """
    ckpt = load_checkpoint(path)
    config = ckpt["hyper_parameters"]["config"]
    schedule = build(dict(config["schedule"]))
    built, source = build_sampler(sampler, config.get("sampler"), schedule.num_timesteps, learn_sigma_of(config))
    check_conditioning(config["model"].get("num_classes"), class_label, guidance_scale)
    return CheckpointSampler(Path(path), ckpt, built, source)


def checkpoint_ddpm(opened: CheckpointSampler, device: torch.device, use_ema: bool = True) -> tuple[Any, bool]:
    """Build the opened checkpoint's DDPM on ``device`` (eval mode; EMA weights when asked and present).

    Returns:
        ``(ddpm, used_ema)``.
    """
    used_ema = use_ema and has_ema(opened.ckpt)
    ddpm = ddpm_from_checkpoint(opened.ckpt, map_location=device, use_ema=use_ema, path=str(opened.path))
    opened.ckpt = {}  # the weights now live in the module
    return ddpm, used_ema


def sample_checkpoint(
    opened: CheckpointSampler, num_samples: int, device: torch.device, use_ema: bool = True, **draw: Any
) -> tuple[Drawn, bool]:
    """Build the checkpoint's DDPM on ``device`` and :func:`draw_samples` from it with the opened sampler.

    Returns:
        ``(drawn, used_ema)``.
    """
    ddpm, used_ema = checkpoint_ddpm(opened, device, use_ema)
    return draw_samples(ddpm, num_samples, sampler=opened.sampler, **draw), used_ema


def write_samples(out_dir: Path, drawn: Drawn, overwrite: bool = False) -> dict[str, Path | None]:
    """Write ``samples.npz`` (``arr_0``: ``(N, 32, 32, 1)`` uint8, the layout of guided-diffusion's evaluator;
    ``arr_1``: the labels of class-conditional samples), ``grid.png`` (the first 64) and, with a trajectory,
    ``trajectory.png`` (rows = samples, columns = x_t from noise to x0) and ``trajectory.gif`` into ``out_dir``.
    With ``overwrite``, trajectory pictures of an earlier run are removed when this one has none.

    Returns:
        ``{"samples", "grid", "trajectory_png", "trajectory_gif"}`` paths (None for pictures not written).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    images = to_uint8(drawn.x0)
    arrays = [images.permute(0, 2, 3, 1).contiguous().numpy()]
    if drawn.labels is not None:
        arrays.append(drawn.labels.numpy())

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # an open file: np.savez would append .npz to a path
            np.savez(f, *arrays)

    samples = atomic_write(out_dir / SAMPLES_FILE, write_npz)
    grid = save_png(sample_grid(to_model_range(images[:GRID_MAX])), out_dir / GRID_FILE)
    traj_png = traj_gif = None
    if drawn.frames:
        traj_png = save_png(trajectory_grid(drawn.frames), out_dir / TRAJECTORY_PNG)
        traj_gif = save_gif(drawn.frames, out_dir / TRAJECTORY_GIF)
    elif overwrite:
        for name in (TRAJECTORY_PNG, TRAJECTORY_GIF):
            (out_dir / name).unlink(missing_ok=True)
    return {"samples": samples, "grid": grid, "trajectory_png": traj_png, "trajectory_gif": traj_gif}
