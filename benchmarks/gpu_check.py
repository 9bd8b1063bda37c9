"""GPU check: a short bf16 DDPM training and DDIM-50 sampling with DiffUNet on one CUDA GPU.

Prints training images/s, peak GPU memory, DDIM-50 sampling images/s and the projected wall time of the full
plan (100 epochs over 60,000 images), and writes them as JSON. Synthetic [-1, 1] images are used (speed does not
depend on the data), so no dataset is needed.

    python benchmarks/gpu_check.py                  # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --smoke          # anywhere: tiny network, 2 steps, CPU allowed (CI)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm_lightning.module import DDPM
from ddpm_lightning.networks import ADMUNetEps, DiffUNetEps
from ddpm_lightning.samplers import DDIMSampler
from ddpm_lightning.schedule import NoiseSchedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps (after 5 warm-up steps)")
    parser.add_argument("--num-samples", type=int, default=256, help="images for the DDIM-50 timing")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--smoke", action="store_true", help="tiny network, 2 steps, CPU allowed")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "gpu_check.json"),
                        help="where the JSON goes (default: %(default)s)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("error: no CUDA GPU visible (torch.cuda.is_available() is False); use --smoke to test the script")
    device = torch.device("cuda" if cuda else "cpu")
    net = ADMUNetEps(channel_mult=(1,), attn_resolutions=()) if args.smoke else DiffUNetEps()
    steps, warmup, num_samples = (2, 1, 4) if args.smoke else (args.steps, 5, args.num_samples)
    model = DDPM(net, NoiseSchedule()).to(device)
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-4)
    x0 = torch.rand(args.batch_size, 1, 32, 32, device=device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(i: int) -> None:
        with autocast:
            loss = model.training_step(x0, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    train_ips = steps * args.batch_size / (time.perf_counter() - start)
    peak_train = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    start = time.perf_counter()
    with autocast:
        model.sample(num_samples, generator=torch.Generator(device=device).manual_seed(0), sampler=DDIMSampler(steps=50))
    if cuda:
        torch.cuda.synchronize()
    sample_ips = num_samples / (time.perf_counter() - start)
    plan_hours = 100 * 60_000 / train_ips / 3600
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "network": type(net).__name__,
        "train_images_per_s": train_ips,
        "peak_train_gpu_memory_gib": peak_train,
        "ddim50_images_per_s": sample_ips,
        "projected_100_epochs_60k_hours": plan_hours,
    }
    for key, value in result.items():
        print(f"{key:32}: {value:.2f}" if isinstance(value, float) else f"{key:32}: {value}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
