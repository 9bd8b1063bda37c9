"""Per-step sampling cost of the project's samplers with adm_small and DiffUNet (untrained weights; speed does not
depend on them). DDPM-1000 is timed as ``--ddpm-steps`` respaced steps (the same work per step) and scaled to 1000.

    python benchmarks/sampling_speed.py --num-samples 16
    python benchmarks/sampling_speed.py --quick --smoke     # seconds: tiny network, 2 steps (CI)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ddpm_lightning.module import DDPM
from ddpm_lightning.networks import ADMUNetEps, DiffUNetEps
from ddpm_lightning.samplers import DDIMSampler, DDPMSampler
from ddpm_lightning.schedule import NoiseSchedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--ddpm-steps", type=int, default=100, help="respaced DDPM steps actually run (scaled to T)")
    parser.add_argument("--networks", default="adm_small,diffunet")
    parser.add_argument("--quick", action="store_true", help="adm_small only")
    parser.add_argument("--smoke", action="store_true", help="a tiny network and 2 steps: proves the script runs")
    parser.add_argument("--json", default="sampling_speed.json")
    args = parser.parse_args()
    nets = {
        "adm_small": lambda: ADMUNetEps(),
        "diffunet": lambda: DiffUNetEps(),
        "adm_tiny": lambda: ADMUNetEps(channel_mult=(1,), attn_resolutions=()),
    }
    names = ["adm_tiny"] if args.smoke else (["adm_small"] if args.quick else args.networks.split(","))
    ddim_steps, ddpm_steps = (2, 2) if args.smoke else (args.ddim_steps, args.ddpm_steps)
    torch.manual_seed(0)
    rows = []
    for name in names:
        model = DDPM(nets[name](), NoiseSchedule())
        model.sample(args.num_samples, sampler=DDIMSampler(steps=2))  # warm-up
        for label, sampler, steps in [
            (f"DDIM-{ddim_steps}", DDIMSampler(steps=ddim_steps), ddim_steps),
            ("DDPM-1000", DDPMSampler(steps=ddpm_steps), ddpm_steps),
        ]:
            start = time.perf_counter()
            model.sample(args.num_samples, sampler=sampler)
            per_step = (time.perf_counter() - start) / steps
            total = per_step * (1000 if label == "DDPM-1000" else steps)
            rows.append(dict(network=name, sampler=label, ms_per_step=1000 * per_step, seconds=total,
                             images_per_s=args.num_samples / total, num_samples=args.num_samples))
    print(f"{'network':10} {'sampler':10} {'ms/step':>9} {'seconds':>9} {'images/s':>9}")
    for r in rows:
        print(f"{r['network']:10} {r['sampler']:10} {r['ms_per_step']:9.0f} {r['seconds']:9.1f} {r['images_per_s']:9.3f}")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
