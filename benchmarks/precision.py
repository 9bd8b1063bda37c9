"""Precision and memory-format variants (issue #7): fp32 vs bf16 autocast vs channels_last (fp32) vs torch.compile
(``--compile`` only: compiling takes minutes on a CPU), measured side by side in one run on CUDA when available,
else on the CPU. For each network and variant:

* training: images/s of a training step (epsilon-MSE forward + backward + Adam step, dropout on) at
  ``--batch-size``; the accuracy cost is the relative difference of the loss, |L - L_fp32| / L_fp32, and the
  relative L2 of the gradient, ||g - g_fp32|| / ||g_fp32||, at one fixed batch (fixed x0, t, noise; same weights;
  dropout off so that only the arithmetic differs);
* sampling: images/s of DDIM-``--ddim-steps`` (eta = 0, deterministic) at ``--num-samples``, and the relative L2
  ||x - x_fp32|| / ||x_fp32|| of the samples from the same noise and the same weights.

Speeds are medians over ``--reps`` repetitions run in interleaved order (fp32, bf16, channels_last, fp32, ...) and
reported as ratios to fp32; on CUDA the peak GPU memory of each variant is reported too. Weights are random, with
deepinv's zero-initialised residual branches re-initialised so that every layer contributes (as in
sampling_speed.py); images are synthetic (speed does not depend on the data).

    python benchmarks/precision.py                      # adm_small and DiffUNet (CPU: ~20 minutes)
    python benchmarks/precision.py --compile            # also torch.compile (CPU: several more minutes)
    python benchmarks/precision.py --quick              # ~2 minutes on 2 CPU cores: adm_small, 2 reps, no compile
    python benchmarks/precision.py --quick --smoke      # seconds: tiny network, batch 2, DDIM-2 (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_lightning.networks import count_parameters
from ddpm_lightning.samplers import DDIMSampler
from ddpm_lightning.schedule import NoiseSchedule

from common import NETS, machine, randomize_zero_init, result_path


def make_variant(name: str, base: nn.Module, device: torch.device) -> SimpleNamespace:
    """A copy of ``base`` (same weights) with its own Adam, memory format, autocast context and forward."""
    fmt = torch.channels_last if name == "channels_last" else torch.contiguous_format
    net = copy.deepcopy(base).to(device).to(memory_format=fmt)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if name == "bf16" else contextlib.nullcontext
    return SimpleNamespace(
        name=name,
        net=net,
        fwd=torch.compile(net) if name == "compile" else net,
        amp=amp,
        fmt=fmt,
        opt=torch.optim.Adam(net.parameters(), lr=1e-4),
        ms={"train": [], "sample": []},
        peak={"train": 0.0, "sample": 0.0},
    )


def eps_loss(v: SimpleNamespace, schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """The training objective of ``DDPM._eps_loss`` (epsilon-MSE, Ho et al. Eq. 14) under the variant's settings."""
    x0, noise = x0.contiguous(memory_format=v.fmt), noise.contiguous(memory_format=v.fmt)
    with v.amp():
        eps = v.fwd(schedule.q_sample(x0, t, noise), t)
    return F.mse_loss(eps.float(), noise.float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="adm_small,diffunet", help=f"comma-separated, of {list(NETS)}")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps per repetition (2 CPU, 20 CUDA)")
    parser.add_argument("--num-samples", type=int, default=16, help="sampling batch")
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians are reported)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile variant (minutes on a CPU)")
    parser.add_argument(
        "--quick", action="store_true", help="~2 minutes on a CPU: adm_small only, 1 step x 2 reps, DDIM-10 of 8 images"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny network, batch 2, DDIM-2: proves the script runs")
    parser.add_argument(
        "--json", default=result_path("precision.json"), help="where the JSON goes (default: %(default)s)"
    )
    args = parser.parse_args()
    info = machine(args.smoke)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    names, batch, num_samples, ddim_steps, reps = (
        args.networks.split(","),
        args.batch_size,
        args.num_samples,
        args.ddim_steps,
        args.reps,
    )
    train_steps = args.train_steps or (20 if cuda else 2)
    if args.quick:
        names, reps, train_steps = ["adm_small"], 2, args.train_steps or (20 if cuda else 1)
        if not cuda:  # bf16 samples at ~0.2 images/s on a CPU without bf16 units: keep the quick run short
            num_samples, ddim_steps = min(num_samples, 8), min(ddim_steps, 10)
    if args.smoke:
        names, batch, num_samples, ddim_steps, reps, train_steps = ["adm_tiny"], 2, 2, 2, 2, 1
    variants = ["fp32", "bf16", "channels_last"] + (["compile"] if args.compile else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    schedule = NoiseSchedule().to(device)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 1, 32, 32, generator=g) * 2 - 1).to(device)
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g).to(device)
    noise = torch.randn(batch, 1, 32, 32, generator=g).to(device)
    x_T = torch.randn(num_samples, 1, 32, 32, generator=g).to(device)
    rows = []

    def timed(v: SimpleNamespace, kind: str, fn: Callable[[], object]) -> object:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        v.ms[kind].append(time.perf_counter() - start)
        if cuda:
            v.peak[kind] = max(v.peak[kind], torch.cuda.max_memory_allocated() / 2**30)
        return out

    def train(v: SimpleNamespace) -> None:
        for _ in range(train_steps):
            loss = eps_loss(v, schedule, x0, t, noise)
            v.opt.zero_grad(set_to_none=True)
            loss.backward()
            v.opt.step()

    def sample(v: SimpleNamespace, steps: int) -> Tensor:
        with v.amp():
            return DDIMSampler(steps=steps)(
                lambda x, tt: v.fwd(x, tt), schedule, x_T.contiguous(memory_format=v.fmt)
            ).x0

    for name in names:
        torch.manual_seed(0)
        base = randomize_zero_init(NETS[name]())
        print(f"{name}: {count_parameters(base) / 1e6:.2f}M parameters on {device}; variants {variants}")
        vs = [make_variant(n, base, device) for n in variants]
        # 1. accuracy of the loss and gradient at the initial (shared) weights, dropout off
        for v in vs:
            v.net.eval()
            loss = eps_loss(v, schedule, x0, t, noise)
            grads = torch.autograd.grad(loss, list(v.net.parameters()))
            v.loss, v.grad = loss.item(), torch.cat([g.flatten().float().cpu() for g in grads])
        # 2. sampling speed and accuracy (eval mode, weights still shared); the first repetition's samples are kept
        for v in vs:
            sample(v, 2)  # warm-up (and compilation)
        for rep in range(reps):
            for v in vs:
                x = timed(v, "sample", lambda v=v: sample(v, ddim_steps))
                if rep == 0:
                    v.x0 = x.float()
        # 3. training speed (train mode: dropout on; the weights of the variants diverge from here)
        for v in vs:
            v.net.train()
            train(v)  # warm-up (and compilation)
        for _ in range(reps):
            for v in vs:
                timed(v, "train", lambda v=v: train(v))
        ref = vs[0]
        train_ips = {v.name: batch * train_steps / statistics.median(v.ms["train"]) for v in vs}
        sample_ips = {v.name: num_samples / statistics.median(v.ms["sample"]) for v in vs}
        for v in vs:
            rows.append(
                dict(
                    network=name,
                    variant=v.name,
                    device=str(device),
                    train_images_per_s=train_ips[v.name],
                    train_speedup=train_ips[v.name] / train_ips["fp32"],
                    loss=v.loss,
                    loss_rel_diff=abs(v.loss - ref.loss) / abs(ref.loss),
                    grad_rel_l2=float((v.grad - ref.grad).norm() / ref.grad.norm()),
                    sample_images_per_s=sample_ips[v.name],
                    sample_speedup=sample_ips[v.name] / sample_ips["fp32"],
                    sample_rel_l2=float((v.x0 - ref.x0).norm() / ref.x0.norm()),
                    peak_train_gib=v.peak["train"] if cuda else None,
                    peak_sample_gib=v.peak["sample"] if cuda else None,
                )
            )

    print(
        f"\ntraining: batch {batch}, {train_steps} step(s) x {reps} reps; sampling: DDIM-{ddim_steps}, "
        f"{num_samples} images x {reps} reps; x fp32 = speed ratio to fp32"
    )
    print(
        f"{'network':10} {'variant':14} {'train img/s':>11} {'x fp32':>7} {'loss rel':>9} {'grad relL2':>10} "
        f"{'DDIM img/s':>10} {'x fp32':>7} {'sample relL2':>12}" + (f" {'peak GiB tr/smp':>16}" if cuda else "")
    )
    for r in rows:
        print(
            f"{r['network']:10} {r['variant']:14} {r['train_images_per_s']:11.2f} {r['train_speedup']:7.2f} "
            f"{r['loss_rel_diff']:9.1e} {r['grad_rel_l2']:10.1e} {r['sample_images_per_s']:10.2f} "
            f"{r['sample_speedup']:7.2f} {r['sample_rel_l2']:12.1e}"
            + (f" {r['peak_train_gib']:7.2f} / {r['peak_sample_gib']:6.2f}" if cuda else "")
        )
    result = dict(
        machine=info,
        device=torch.cuda.get_device_name() if cuda else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        quick=args.quick,
        smoke=args.smoke,
        batch_size=batch,
        train_steps_per_rep=train_steps,
        num_samples=num_samples,
        ddim_steps=ddim_steps,
        reps=reps,
        rows=rows,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
