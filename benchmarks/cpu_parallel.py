"""How to spend a CPU's cores on training: one process with N intra-op threads, N single-threaded DDP processes over
gloo, inter-op threads, and the batch size (issue #29), for the preset network (adm_fast by default).

Each arm is a bare training loop (the train_overhead.py loop: in-memory MNIST batches, q_sample, the eps-MSE,
backward, gradient clipping, Adam), run in fresh processes (thread pools are fixed at start-up), timed over
``--steps`` steps after ``--warmup`` untimed ones:

* ``1x2``: one process, 2 intra-op threads, batch 64 (``trainer=cpu`` until now);
* ``1x2 interop1``: the same with 1 inter-op thread; ``1x1``: one process, one thread;
* ``2x1 ddp``: two processes, one thread each, ``DistributedDataParallel`` over gloo, batch 32 each (64 in all): the
  gradient all-reduce included;
* ``2x1 alone``: the same two processes without DDP (no all-reduce): the upper bound of ``2x1 ddp``;
* ``1x2 b32`` / ``1x2 b128``: other batch sizes (the per-image quality of a batch size is docs/mnist_cpu.md's matter).

The arms alternate A B C ... A B C for ``--rounds`` rounds (>= 5 outside ``--smoke``) and the figure of an arm is
the median of its rounds; each run's figure is images / second over its timed steps (every process's steps, in
parallel arms). The JSON also gives each arm's ratio to ``1x2`` and its GFLOP/s against this CPU's fp32 GEMM limit.

    python benchmarks/cpu_parallel.py                  # adm_fast, 5 rounds, ~10 minutes on 2 cores
    python benchmarks/cpu_parallel.py --quick --smoke  # seconds (CI): tiny network, two arms, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

#: arm -> (processes, intra-op threads per process, inter-op threads or None, batch per process, DDP)
ARMS = {
    "1x2": (1, 2, None, 64, False),
    "2x1 ddp": (2, 1, None, 32, True),
    "2x1 alone": (2, 1, None, 32, False),
    "1x1": (1, 1, None, 64, False),
    "1x2 interop1": (1, 2, 1, 64, False),
    "1x2 b32": (1, 2, None, 32, False),
    "1x2 b128": (1, 2, None, 128, False),
}


def _loop(network: str, batch: int, steps: int, warmup: int, rank: int, world: int, ddp: bool) -> float:
    """Seconds of ``steps`` timed training steps (after ``warmup``) in this process; with ``ddp`` inside a gloo
    group."""
    import torch
    import torch.nn.functional as F

    from benchmarks.common import NETS
    from ddpm_lightning.schedule import NoiseSchedule

    torch.manual_seed(rank)
    net = NETS[network]().train()
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False, gradient_as_bucket_view=True)
    schedule = NoiseSchedule()
    sqrt_ab = schedule.alphas_cumprod.sqrt().float()
    sqrt_1m_ab = (1 - schedule.alphas_cumprod).sqrt().float()
    images = torch.randint(0, 256, (4096, 1, 32, 32), dtype=torch.uint8)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if ddp:
                torch.distributed.barrier()
            start = time.perf_counter()
        idx = torch.randint(0, images.shape[0], (batch,))
        x0 = images[idx].float().div_(127.5).sub_(1.0)
        t = torch.randint(0, schedule.num_timesteps, (batch,))
        eps = torch.randn_like(x0)
        x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_ab[t].view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(net(x_t, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    if ddp:
        torch.distributed.barrier()
    return time.perf_counter() - start


def worker(spec: dict) -> None:
    """One process of an arm (started by :func:`run_arm`): set its threads, join the group, print its seconds."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["interop"]:
        torch.set_num_interop_threads(spec["interop"])
    if spec["ddp"]:
        torch.distributed.init_process_group(
            "gloo", rank=spec["rank"], world_size=spec["world"], init_method=f"tcp://127.0.0.1:{spec['port']}"
        )
    seconds = _loop(
        spec["network"], spec["batch"], spec["steps"], spec["warmup"], spec["rank"], spec["world"], spec["ddp"]
    )
    if spec["ddp"]:
        torch.distributed.destroy_process_group()
    print("SECONDS", json.dumps(seconds), flush=True)


def run_arm(name: str, network: str, steps: int, warmup: int, port: int) -> float:
    """Images/s of one run of arm ``name``: every process's images over the slowest process's timed seconds."""
    procs, threads, interop, batch, ddp = ARMS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parent)}
    children = []
    for rank in range(procs):
        spec = dict(
            network=network,
            batch=batch,
            steps=steps,
            warmup=warmup,
            rank=rank,
            world=procs,
            ddp=ddp,
            threads=threads,
            interop=interop,
            port=port,
        )
        children.append(
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    seconds = []
    for child in children:
        out, err = child.communicate(timeout=1800)
        if child.returncode != 0:
            raise SystemExit(f"arm {name!r} failed:\n{err[-3000:]}")
        seconds.append(json.loads(out.rsplit("SECONDS", 1)[1]))
    return procs * batch * steps / max(seconds)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(json.loads(sys.argv[2]))
    from benchmarks.common import NETS, machine, result_path, training_gflop_per_image, write_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="adm_fast", help=f"one of {list(NETS)}")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {list(ARMS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="20 timed steps")
    parser.add_argument(
        "--smoke", action="store_true", help="adm_tiny, the first two arms, 1 round of 2 steps: proves the script runs"
    )
    parser.add_argument(
        "--json", default=result_path("cpu_parallel.json"), help="where the JSON goes (default: %(default)s)"
    )
    args = parser.parse_args()
    if args.rounds < 5 and not args.smoke:
        parser.error(f"--rounds={args.rounds}: must be >= 5 (the medians of fewer rounds are noise)")
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    network, rounds, steps, warmup = args.network, args.rounds, args.steps, args.warmup
    if args.quick:
        steps = 20
    if args.smoke:
        network, rounds, steps, warmup, arms = "adm_tiny", 1, 2, 1, arms[:2]
    info = machine(args.smoke)
    gflop = training_gflop_per_image(NETS[network]())
    runs: dict[str, list[float]] = {arm: [] for arm in arms}
    header = dict(machine=info, network=network, gflop_per_image=gflop, rounds=rounds, steps=steps, warmup=warmup)
    for r in range(rounds):
        for i, arm in enumerate(arms):
            runs[arm].append(run_arm(arm, network, steps, warmup, port=29600 + (r * len(arms) + i) % 300))
            print(f"round {r + 1}/{rounds} {arm:14} {runs[arm][-1]:7.1f} images/s", flush=True)
        base = statistics.median(runs[arms[0]])
        rows = [
            dict(
                arm=arm,
                processes=ARMS[arm][0],
                threads=ARMS[arm][1],
                interop=ARMS[arm][2],
                batch_per_process=ARMS[arm][3],
                ddp=ARMS[arm][4],
                runs=runs[arm],
                images_per_s=statistics.median(runs[arm]),
                ratio_to_first=statistics.median(runs[arm]) / base,
                gflops=statistics.median(runs[arm]) * gflop,
                of_fp32_gemm=statistics.median(runs[arm]) * gflop / info["gemm_fp32_gflops"],
            )
            for arm in arms
            if runs[arm]
        ]
        write_rows(args.json, header, rows)
    print(
        f"\n{network}, {steps} timed steps, median of {rounds} rounds ({info['cpu_model']}; fp32 GEMM "
        f"{info['gemm_fp32_gflops']:.0f} GFLOP/s)"
    )
    print("| arm | processes x threads | batch per process | images/s | vs " + arms[0] + " | GFLOP/s | of GEMM |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['arm']} | {row['processes']} x {row['threads']} | {row['batch_per_process']} | "
            f"{row['images_per_s']:.1f} | {row['ratio_to_first']:.2f} | {row['gflops']:.0f} | "
            f"{row['of_fp32_gemm']:.2f} |"
        )


if __name__ == "__main__":
    main()
