"""``ddpm-sample``: draw images from a ``ddpm-train`` checkpoint and write them for evaluation and viewing.

Usage: ``ddpm-sample ckpt_path=<run>/checkpoints/last.ckpt num_samples=10000``. By default the sampler is the one
stored in the checkpoint (the run's own: what it drew its grids and evaluated with); ``sampler.steps=20`` changes
one of its keys, ``sampler=ddim`` / ``sampler=ddpm`` picks another (see :func:`ddpm_lightning.config.sampler_node`).
``trajectory=true`` adds the denoising pictures.

Outputs in ``out_dir`` (default: Hydra's ``outputs/samples/<day>/<time>``):

* ``samples.npz``: ``arr_0``, ``(N, 32, 32, 1)`` uint8 0..255 (the layout of guided-diffusion's evaluator);
* ``grid.png``: the first (up to) 64 samples;
* with ``trajectory=true``: ``trajectory.png`` (rows = the first 8 samples, columns = x_t from pure noise to x0)
  and ``trajectory.gif`` (one frame per recorded x_t, the grid of those 8 samples; consecutive frames that are
  pixel-identical are merged by Pillow).

Reproducibility: batch i draws x_T and the per-step noise from a ``torch.Generator`` on the device seeded with
``seed + i``, so the same checkpoint, sampler, seed, batch_size and device give the same samples.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from ddpm_lightning.checkpoint import ddpm_from_checkpoint, has_ema, load_checkpoint
from ddpm_lightning.config import CONFIG_DIR, build, cli, sampler_node
from ddpm_lightning.data import to_uint8
from ddpm_lightning.errors import ConfigError, flag, int_at_least, invalid, is_int, is_number, out_dir_path
from ddpm_lightning.images import sample_grid, save_png, trajectory_grid


SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
TRAJECTORY_PNG = "trajectory.png"
TRAJECTORY_GIF = "trajectory.gif"
GRID_MAX = 64  #: samples shown in grid.png
TRAJECTORY_ROWS = 8  #: samples shown in trajectory.png / trajectory.gif
GIF_FRAME_MS = 100
GIF_LAST_FRAME_MS = 1500


def resolve_device(device: object) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other strings must name a usable torch device."""
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


def _validate(cfg: DictConfig) -> dict[str, Any]:
    """Every check that needs neither the checkpoint's weights nor the network, in the order a user fixes them."""
    opts: dict[str, Any] = {
        "num_samples": int_at_least(cfg, "num_samples", 1, "must be a positive integer"),
        "batch_size": int_at_least(cfg, "batch_size", 1, "must be a positive integer"),
        "seed": int_at_least(cfg, "seed", 0, "must be an integer >= 0"),
        "trajectory_frames": int_at_least(cfg, "trajectory_frames", 2, "must be an integer >= 2"),
        "use_ema": flag(cfg, "use_ema"),
        "trajectory": flag(cfg, "trajectory"),
        "overwrite": flag(cfg, "overwrite"),
    }
    opts["device"] = resolve_device(cfg.get("device", "auto"))
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path is required: ddpm-sample ckpt_path=<run>/checkpoints/last.ckpt")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None or not Path(str(ckpt_path)).expanduser().is_file():
        raise invalid("ckpt_path", None if ckpt_path is None else str(ckpt_path), "no such checkpoint file")
    opts["ckpt_path"] = Path(str(ckpt_path)).expanduser().resolve()
    out_dir = out_dir_path(cfg, "ddpm-sample")
    if out_dir.exists() and not out_dir.is_dir():
        raise invalid("out_dir", str(out_dir), "exists and is not a folder")
    if (out_dir / SAMPLES_FILE).exists() and not opts["overwrite"]:
        raise invalid(
            "out_dir",
            str(out_dir),
            f"already holds {SAMPLES_FILE}; set overwrite=true to replace it, or choose another out_dir",
        )
    opts["out_dir"] = out_dir
    opts["sampler"] = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") is not None else None
    label = cfg.get("class_label")
    if label is not None and (not is_int(label) or label < 0):
        raise invalid("class_label", label, "must be null or an integer class index >= 0")
    scale = cfg.get("guidance_scale", 1.0)
    if not is_number(scale) or not math.isfinite(scale):
        raise invalid("guidance_scale", scale, "must be a finite number (1 = no guidance)")
    opts["class_label"], opts["guidance_scale"] = label, float(scale)
    return opts


def _check_conditioning(opts: dict[str, Any], num_classes: int | None) -> None:
    """class_label / guidance_scale against the checkpoint's model, before the network is built."""
    if num_classes is None:
        if opts["class_label"] is not None:
            raise invalid("class_label", opts["class_label"], "the checkpoint's model is unconditional (model.num_classes=null)")
        if opts["guidance_scale"] != 1.0:
            raise invalid(
                "guidance_scale", opts["guidance_scale"], "the checkpoint's model is unconditional (model.num_classes=null); use 1.0"
            )
    elif opts["class_label"] is not None and opts["class_label"] >= num_classes:
        raise invalid("class_label", opts["class_label"], f"must be in [0, {num_classes - 1}] for this checkpoint")


def _save_gif(frames: list[torch.Tensor], path: Path) -> Path:
    """One GIF frame per ``(n, C, H, W)`` tensor in [-1, 1] (the grid of the n samples), looping forever."""
    images = []
    for x in frames:
        grid = sample_grid(x)  # (3, H, W) in [0, 1], grey replicated
        images.append(Image.fromarray((grid[0] * 255).round().to(torch.uint8).numpy(), mode="L"))
    durations = [GIF_FRAME_MS] * (len(images) - 1) + [GIF_LAST_FRAME_MS]
    tmp = path.with_name(path.name + ".tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    os.replace(tmp, path)
    return path


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images from ``cfg.ckpt_path`` with ``cfg.sampler`` and write them to ``cfg.out_dir``.

    Every option is checked before the network is built (and before anything is written).

    Returns:
        dict with ``out_dir``, ``samples`` (samples.npz), ``grid``, ``trajectory_png`` and ``trajectory_gif``
        (None unless ``trajectory=true``), ``num_samples``, ``num_frames`` (recorded trajectory frames, 0 when
        off), ``sampler`` (the sampler used), ``sampler_source`` (e.g. "the checkpoint's sampler"), ``device``,
        ``used_ema``, ``seconds`` (sampling wall time) and
        ``images_per_s``.

    Raises:
        ConfigError: one line naming the key, e.g. ``num_samples=0 is invalid: must be a positive integer``,
            ``sampler.steps=2000 is invalid: must be an integer in [1, schedule.timesteps=1000]`` or an
            ``out_dir`` that already holds samples.npz without ``overwrite=true``.
    """
    opts = _validate(cfg)
    path = str(opts["ckpt_path"])
    ckpt = load_checkpoint(path)
    config = ckpt["hyper_parameters"]["config"]
    # sampler.steps vs the checkpoint's schedule.timesteps, before the network is built (the schedule is cheap)
    schedule = build(dict(config["schedule"]))
    node, sampler_source = sampler_node(opts["sampler"], config.get("sampler"))
    sampler = build(node, key="sampler")
    sampler.timesteps(schedule.num_timesteps)  # raises ConfigError naming sampler.steps
    num_classes = config["model"].get("num_classes")
    _check_conditioning(opts, num_classes)
    used_ema = opts["use_ema"] and has_ema(ckpt)
    model = ddpm_from_checkpoint(ckpt, map_location=opts["device"], use_ema=opts["use_ema"], path=path)
    del ckpt
    num_steps = len(sampler.timesteps(model.schedule.num_timesteps))

    n, bs, device = opts["num_samples"], opts["batch_size"], opts["device"]
    every = max(1, num_steps // (opts["trajectory_frames"] - 1)) if opts["trajectory"] else None
    chunks: list[torch.Tensor] = []
    label_chunks: list[torch.Tensor] = []
    traj_chunks: list[list[torch.Tensor]] = []  # per batch: frames of its first rows, (k, C, H, W) on the CPU
    traj_rows = 0
    num_batches = math.ceil(n / bs)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(num_batches), desc="batches", unit="batch", dynamic_ncols=True):
            size = min(bs, n - i * bs)
            generator = torch.Generator(device=device).manual_seed(opts["seed"] + i)
            want = min(TRAJECTORY_ROWS - traj_rows, size) if every is not None else 0
            labels = None
            if num_classes is not None:  # one class, or all classes in turn across the whole run
                first = opts["class_label"]
                labels = torch.full((size,), first) if first is not None else torch.arange(i * bs, i * bs + size) % num_classes
                label_chunks.append(labels)
            out = model.sample(
                size,
                generator=generator,
                sampler=sampler,
                trajectory_every=every if want > 0 else None,
                progress=True,
                class_labels=labels,
                guidance_scale=opts["guidance_scale"],
            )
            chunks.append(to_uint8(out.x0).cpu())
            if want > 0:
                traj_chunks.append([x[:want] for _, x in out.trajectory])
                traj_rows += want
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    images = torch.cat(chunks)  # (N, C, H, W) uint8

    out_dir = opts["out_dir"]
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / SAMPLES_FILE
    tmp = out_dir / (SAMPLES_FILE + ".tmp")
    with open(tmp, "wb") as f:
        arrays = [images.permute(0, 2, 3, 1).contiguous().numpy()]
        if label_chunks:  # guided-diffusion's layout for class-conditional samples: arr_1 = labels
            arrays.append(torch.cat(label_chunks).numpy())
        np.savez(f, *arrays)
    os.replace(tmp, samples_path)
    grid_x = images[:GRID_MAX].float() / 255 * 2 - 1
    grid_path = save_png(sample_grid(grid_x), out_dir / GRID_FILE)
    traj_png = traj_gif = None
    frames: list[torch.Tensor] = []
    if traj_chunks:
        frames = [torch.cat([batch[f] for batch in traj_chunks]) for f in range(len(traj_chunks[0]))]
        traj_png = save_png(trajectory_grid(frames), out_dir / TRAJECTORY_PNG)
        traj_gif = _save_gif(frames, out_dir / TRAJECTORY_GIF)
    elif opts["overwrite"]:  # do not leave the pictures of an earlier run next to new samples
        for name in (TRAJECTORY_PNG, TRAJECTORY_GIF):
            (out_dir / name).unlink(missing_ok=True)

    result = {
        "out_dir": out_dir,
        "samples": samples_path,
        "grid": grid_path,
        "trajectory_png": traj_png,
        "trajectory_gif": traj_gif,
        "num_samples": n,
        "num_frames": len(frames),
        "sampler": sampler,
        "sampler_source": sampler_source,
        "device": str(device),
        "used_ema": used_ema,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("inf"),
    }
    lines = [
        f"\nSampled {n} images with {sampler!r} ({sampler_source}; {num_steps} steps, "
        f"{'EMA' if used_ema else 'raw'} weights, {device})",
        f"  time       : {seconds:.2f} s ({result['images_per_s']:.1f} images/s)",
        f"  samples    : {samples_path}  (arr_0: {tuple(images.shape[i] for i in (0, 2, 3, 1))} uint8)",
        f"  grid       : {grid_path}",
    ]
    if traj_png is not None:
        lines += [f"  trajectory : {traj_png}", f"  animation  : {traj_gif} ({len(frames)} frames)"]
    print("\n".join(lines), flush=True)
    return result


@cli(CONFIG_DIR)
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    """Console entry point. Bad input: one line on stderr and exit status 2, no traceback."""
    try:
        sample(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
