"""``ddpm-sample``: draw images from a ``ddpm-train`` checkpoint and write them for evaluation and viewing.

Usage: ``ddpm-sample ckpt_path=<run>/checkpoints/last.ckpt num_samples=10000``. By default the sampler is the one
stored in the checkpoint (the run's own: what it drew its grids and evaluated with); ``sampler.steps=20`` changes
one of its keys, ``sampler=ddim`` / ``sampler=ddpm`` picks another (see :func:`ddpm_lightning.config.sampler_node`).
``trajectory=true`` adds the denoising pictures. Options: ``conf/sample.yaml``; what is written:
:func:`ddpm_lightning.sampling.write_samples`. Bad input: one line on stderr and exit status 2.

Exit statuses when the file system refuses a path (one line naming the key, e.g. ``out_dir``, and the path, before any
work where it can be known): 4 permission denied, 5 read-only file system, 6 no such folder (or a path under a
regular file), 7 no space left on the device (or disk quota exceeded), 8 any other refusal of the file system.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from ddpm_lightning.config import SampleConfig, check_out_dir, command, options
from ddpm_lightning.errors import ConfigError, check_int


def check_options(opts: SampleConfig) -> None:
    """The ranges of ``ddpm-sample``'s options (their types are the schema's), before anything is read."""
    from ddpm_lightning.sampling import SAMPLES_FILE

    for key, low in (("num_samples", 1), ("batch_size", 1), ("seed", 0), ("trajectory_frames", 2)):
        check_int(key, getattr(opts, key), low, "must be a positive integer" if low == 1 else None)
    check_out_dir(opts.out_dir, SAMPLES_FILE, opts.overwrite)


def sample(cfg: Any) -> dict[str, Any]:
    """Sample ``num_samples`` images from ``ckpt_path`` and write them to ``out_dir``; every option is checked
    before the network is built (and before anything is written).

    Returns:
        dict with ``out_dir``, ``samples``, ``grid``, ``trajectory_png``, ``trajectory_gif`` (paths, None when not
        written), ``num_samples``, ``num_frames``, ``sampler``, ``sampler_source``, ``device``, ``used_ema``,
        ``seconds`` and ``images_per_s``.

    Raises:
        ConfigError: one line naming the key, e.g. ``num_samples=0 is invalid: must be a positive integer``.
    """
    from ddpm_lightning.sampling import (
        open_checkpoint,
        resolve_device,
        sample_checkpoint,
        write_samples,
    )  # torch, Lightning

    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path is required: ddpm-sample ckpt_path=<run>/checkpoints/last.ckpt")
    opts = options(cfg, SampleConfig, "ddpm-sample")
    check_options(opts)
    device = resolve_device(opts.device)
    opened = open_checkpoint(opts.ckpt_path, opts.sampler, opts.class_label, opts.guidance_scale)
    drawn, used_ema = sample_checkpoint(
        opened,
        opts.num_samples,
        device,
        use_ema=opts.use_ema,
        batch_size=opts.batch_size,
        seed=opts.seed,
        class_label=opts.class_label,
        guidance_scale=opts.guidance_scale,
        trajectory_frames=opts.trajectory_frames if opts.trajectory else None,
        progress=True,
    )
    paths = write_samples(opts.out_dir, drawn, overwrite=opts.overwrite)
    n, seconds = opts.num_samples, drawn.seconds
    result = {
        "out_dir": opts.out_dir,
        **paths,
        "num_samples": n,
        "num_frames": len(drawn.frames),
        "sampler": opened.sampler,
        "sampler_source": opened.sampler_source,
        "device": str(device),
        "used_ema": used_ema,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("inf"),
    }
    lines = [
        f"\nSampled {n} images with {opened.sampler!r} ({opened.sampler_source}; {drawn.num_steps} steps, "
        f"{'EMA' if used_ema else 'raw'} weights, {device})",
        f"  time       : {seconds:.2f} s ({result['images_per_s']:.1f} images/s)",
        f"  samples    : {paths['samples']}  (arr_0: {tuple(drawn.x0.shape[i] for i in (0, 2, 3, 1))} uint8)",
        f"  grid       : {paths['grid']}",
    ]
    if paths["trajectory_png"] is not None:
        lines += [
            f"  trajectory : {paths['trajectory_png']}",
            f"  animation  : {paths['trajectory_gif']} ({len(drawn.frames)} frames)",
        ]
    print("\n".join(lines), flush=True)
    return result


main = command("sample", folders=("out_dir",))(sample)

if __name__ == "__main__":
    main()
