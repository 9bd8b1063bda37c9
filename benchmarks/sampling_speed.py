"""Sampling speed (issues #3, #7): the project's DDPM and DDIM samplers side by side with a bare network forward
(the lower bound) and with diffusers' DDPMScheduler / DDIMScheduler loops around the same network, plus images/s
against batch size. CPU, fp32, eval mode, after a warm-up.

* Per-step cost: each variant runs ``--timed-steps`` steps on the same batch, repeated ``--reps`` times in
  interleaved order (forward, ours DDIM, ours DDPM, diffusers DDIM, diffusers DDPM, forward, ...); medians are
  reported. ``overhead`` = (sampler step - forward) / forward, target <= 2%; ``ours/diffusers`` is the ratio of
  per-step times. DDIM-50 and DDPM-1000 wall times are projected from the per-step times.
* Cross-check: final samples of ours and diffusers from the same x_T (and, for DDPM, the same generator, which
  both draw per-step noise from in the same order): max |ours - diffusers| should be ~1e-5 (float32 vs float64
  coefficients). diffusers' DDIM by default does not re-derive eps from the clipped x0 (guided-diffusion and this
  project do: ``use_clipped_model_output=True``); that default is reported too and differs by O(0.1).
* Batch sweep: images/s of DDIM-``--sweep-steps`` for ``--batch-sizes`` (first network only).

Weights are random (speed does not depend on them), but the residual branches that deepinv initialises to zero
are re-initialised so that every layer contributes to eps and the cross-check is not trivial. diffusers is a dev
dependency: without it those columns are skipped.

    python benchmarks/sampling_speed.py                     # adm_small and DiffUNet (~15 minutes on 2 CPU cores)
    python benchmarks/sampling_speed.py --quick             # ~2 minutes: adm_small, DiffUNet at batch 2 and 2 steps
    python benchmarks/sampling_speed.py --quick --smoke     # seconds: tiny network, 2 steps (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ddpm_lightning.module import DDPM
from ddpm_lightning.networks import count_parameters
from ddpm_lightning.samplers import DDIMSampler, DDPMSampler, strided_timesteps
from ddpm_lightning.schedule import NoiseSchedule

from common import NETS, machine, randomize_zero_init, result_path


def diffusers_schedulers(schedule: NoiseSchedule):
    """DDPMScheduler and DDIMScheduler configured like the project's samplers, or None without diffusers.

    Differences that remain: diffusers builds betas / alphas_cumprod in float32 (ours: float64, applied as Python
    floats) and applies the per-step coefficients as 0-dim tensors; its DDIM re-derives eps from the clipped x0 only
    with ``use_clipped_model_output=True`` (passed below); its DDPM respacing is given our timesteps explicitly
    (``set_timesteps(timesteps=...)``), since its own spacings do not start at T-1 = 999 as ours does.
    """
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError:
        return None
    T = schedule.num_timesteps  # NoiseSchedule() defaults: linear 1e-4 .. 0.02
    common = dict(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type="epsilon",
    )
    ddpm = DDPMScheduler(variance_type="fixed_small", **common)
    # set_alpha_to_one=True: the last DDIM step goes to abar = 1 (the clean image), as ours does
    ddim = DDIMScheduler(set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", **common)
    return ddpm, ddim


@torch.inference_mode()
def diffusers_sample(scheduler, net: nn.Module, noise: Tensor, steps: int, generator=None, clipped_eps=True) -> Tensor:
    """A diffusers sampling loop (as in its DDPM/DDIM pipelines) with our network as the model; returns x0 in
    [-1, 1]."""
    if type(scheduler).__name__ == "DDPMScheduler":
        scheduler.set_timesteps(timesteps=strided_timesteps(scheduler.config.num_train_timesteps, steps))
        kwargs = {}
    else:
        scheduler.set_timesteps(steps)
        kwargs = dict(eta=0.0, use_clipped_model_output=clipped_eps)
    x = noise
    for t in scheduler.timesteps:
        eps = net(x, t.expand(x.shape[0]))
        x = scheduler.step(eps, t, x, generator=generator, **kwargs).prev_sample
    return x.clamp(-1.0, 1.0)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_times(name: str, model: DDPM, scheds, batch: int, steps: int, reps: int, ddim_steps: int) -> list[dict]:
    """Median per-step time of each variant over ``reps`` interleaved repetitions of ``steps`` steps."""
    net = model.net.eval()
    noise = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.full((batch,), 500, dtype=torch.long)

    def forward() -> None:
        with torch.inference_mode():
            for _ in range(steps):
                net(noise, t)

    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    variants = {
        "forward": forward,
        "ours DDIM": lambda: model.sample(batch, noise=noise, sampler=DDIMSampler(steps=steps)),
        "ours DDPM": lambda: model.sample(batch, noise=noise, generator=gen(), sampler=DDPMSampler(steps=steps)),
    }
    if scheds is not None:
        variants["diffusers DDIM"] = lambda: diffusers_sample(scheds[1], net, noise, steps)
        variants["diffusers DDPM"] = lambda: diffusers_sample(scheds[0], net, noise, steps, generator=gen())
    for fn in variants.values():  # warm-up
        fn()
    samples = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            samples[k].append(timed(fn) / steps)
    ms = {k: 1000 * statistics.median(v) for k, v in samples.items()}
    rows = []
    for k, v in ms.items():
        kind = k.split()[-1]
        other = ("diffusers " if k.startswith("ours") else "ours ") + kind
        full = ddim_steps if kind == "DDIM" else 1000
        rows.append(
            dict(
                network=name,
                variant=k,
                batch_size=batch,
                timed_steps=steps,
                reps=reps,
                ms_per_step=v,
                ms_per_step_all=[1000 * s for s in samples[k]],
                overhead_pct=None if k == "forward" else 100 * (v - ms["forward"]) / ms["forward"],
                ratio_ours_over_diffusers=ms[k] / ms[other] if k.startswith("ours") and other in ms else None,
                full_run=None if k == "forward" else f"{kind}-{full}",
                full_run_seconds=None if k == "forward" else v * full / 1000,
                images_per_s=None if k == "forward" else batch / (v * full / 1000),
            )
        )
    return rows


def cross_check(name: str, model: DDPM, scheds, batch: int, ddim_steps: int, ddpm_steps: int) -> list[dict]:
    """Max |ours - diffusers| of final samples from the same noise (DDIM eta=0; DDPM with the same generator)."""
    net = model.net.eval()
    noise = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    ddim = model.sample(batch, noise=noise, sampler=DDIMSampler(steps=ddim_steps)).x0
    ddpm = model.sample(batch, noise=noise, generator=gen(), sampler=DDPMSampler(steps=ddpm_steps)).x0
    diff = lambda a, b: float((a - b).abs().max())  # noqa: E731
    abar_ref = model.schedule.alphas_cumprod
    abar_rel = float(((scheds[1].alphas_cumprod.double() - abar_ref) / abar_ref).abs().max())
    rows = [
        (
            f"DDIM-{ddim_steps}",
            "use_clipped_model_output=True (matches ours)",
            diff(ddim, diffusers_sample(scheds[1], net, noise, ddim_steps)),
        ),
        (
            f"DDIM-{ddim_steps}",
            "diffusers default use_clipped_model_output=False",
            diff(ddim, diffusers_sample(scheds[1], net, noise, ddim_steps, clipped_eps=False)),
        ),
        (
            f"DDPM-{ddpm_steps}",
            "same generator, our respaced timesteps",
            diff(ddpm, diffusers_sample(scheds[0], net, noise, ddpm_steps, generator=gen())),
        ),
    ]
    return [
        dict(network=name, sampler=s, batch_size=batch, setting=c, max_abs_diff=d, alphas_cumprod_max_rel_diff=abar_rel)
        for s, c, d in rows
    ]


def batch_sweep(name: str, model: DDPM, batch_sizes: list[int], steps: int) -> list[dict]:
    rows = []
    model.sample(batch_sizes[0], sampler=DDIMSampler(steps=1))  # warm-up
    for b in batch_sizes:
        seconds = timed(
            lambda b=b: model.sample(b, generator=torch.Generator().manual_seed(5), sampler=DDIMSampler(steps=steps))
        )
        rows.append(
            dict(network=name, sampler=f"DDIM-{steps}", batch_size=b, seconds=seconds, images_per_s=b / seconds)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="adm_small,diffunet", help=f"comma-separated, of {list(NETS)}")
    parser.add_argument("--num-samples", type=int, default=16, help="batch size of the per-step timings")
    parser.add_argument("--timed-steps", type=int, default=10, help="sampler steps per timed repetition")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions (medians are reported)")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the cross-check and projection")
    parser.add_argument("--ddpm-steps", type=int, default=20, help="respaced DDPM steps of the cross-check")
    parser.add_argument("--check-batch", type=int, default=4, help="batch size of the cross-check")
    parser.add_argument("--batch-sizes", default="1,16,64,256", help="batch sweep (first network only)")
    parser.add_argument("--sweep-steps", type=int, default=10)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="~2 minutes: 5 steps x 5 reps, batches <= 64; DiffUNet at batch 2, 2 steps x 3 reps",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny network and 2 steps: proves the script runs")
    parser.add_argument(
        "--json", default=result_path("sampling_speed.json"), help="where the JSON goes (default: %(default)s)"
    )
    args = parser.parse_args()
    info = machine(args.smoke)
    names = args.networks.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    steps, reps, ddim_steps, ddpm_steps = args.timed_steps, args.reps, args.ddim_steps, args.ddpm_steps
    if args.quick:
        steps, reps, batch_sizes = 5, 5, [b for b in batch_sizes if b <= 64]
    if args.smoke:
        names, steps, reps, ddim_steps, ddpm_steps, batch_sizes = ["adm_tiny"], 2, 2, 2, 2, [1, 2]
    torch.manual_seed(0)
    schedule = NoiseSchedule()
    scheds = diffusers_schedulers(schedule)
    notes = [] if scheds is not None else ["diffusers not installed: skipped"]
    if scheds is None:
        print("diffusers not installed: skipped")
    result = dict(
        machine=info,
        device="cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        quick=args.quick,
        smoke=args.smoke,
        diffusers=None,
        step_time=[],
        cross_check=[],
        batch_sweep=[],
        notes=notes,
    )
    if scheds is not None:
        import diffusers

        result["diffusers"] = diffusers.__version__
    for i, name in enumerate(names):
        model = DDPM(randomize_zero_init(NETS[name]()), schedule).eval()
        batch, s, r, check_batch = args.num_samples, steps, reps, args.check_batch
        check_ddim, check_ddpm = ddim_steps, ddpm_steps
        if args.quick and name == "diffunet":
            batch, s, r, check_batch, check_ddim, check_ddpm = 2, 2, 3, 2, 5, 5
            notes.append("quick: DiffUNet at batch 2, 2 steps x 3 reps; DDIM-5 / DDPM-5 cross-check at batch 2")
        print(f"{name}: {count_parameters(model.net) / 1e6:.2f}M parameters, batch {batch}, {s} steps x {r} reps")
        result["step_time"] += step_times(name, model, scheds, batch, s, r, ddim_steps)
        if scheds is not None:
            result["cross_check"] += cross_check(name, model, scheds, min(check_batch, batch), check_ddim, check_ddpm)
        if i == 0:
            result["batch_sweep"] = batch_sweep(name, model, batch_sizes, 2 if args.smoke else args.sweep_steps)

    cell = lambda v, spec, width: "-".rjust(width) if v is None else format(v, spec).rjust(width)  # noqa: E731
    print("\nper-step time (median of interleaved reps; overhead vs a bare forward)")
    print(
        f"{'network':10} {'variant':15} {'ms/step':>9} {'overhead':>9} {'ours/diff':>9} {'full run':>10} {'seconds':>8}"
    )
    for r in result["step_time"]:
        overhead = None if r["overhead_pct"] is None else f"{r['overhead_pct']:+.2f}%"
        print(
            f"{r['network']:10} {r['variant']:15} {r['ms_per_step']:9.1f} {cell(overhead, 's', 9)} "
            f"{cell(r['ratio_ours_over_diffusers'], '.3f', 9)} {cell(r['full_run'], 's', 10)} "
            f"{cell(r['full_run_seconds'], '.1f', 8)}"
        )
    if result["cross_check"]:
        print("\nours vs diffusers, final samples from the same noise")
        print(f"{'network':10} {'sampler':9} {'max|diff|':>10}  setting")
        for r in result["cross_check"]:
            print(f"{r['network']:10} {r['sampler']:9} {r['max_abs_diff']:10.2e}  {r['setting']}")
    print("\nimages/s vs batch size")
    for r in result["batch_sweep"]:
        print(
            f"{r['network']:10} {r['sampler']:8} batch {r['batch_size']:4d} {r['seconds']:8.2f} s "
            f"{r['images_per_s']:8.2f} images/s"
        )
    for n in notes:
        print("note:", n)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
