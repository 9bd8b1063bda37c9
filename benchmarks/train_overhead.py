"""Training overhead: a full ``ddpm-train`` step vs a bare PyTorch loop with the same network, batch, optimizer, lr and
thread count, and the preset network's speed against this CPU's GEMM limit.

The bare loop is the lower bound: in-memory uint8 MNIST, a random batch, q_sample, the epsilon-MSE, backward,
gradient clipping at 1.0 and Adam. The project's step is ``ddpm_lightning.training.train`` with the real configs
(DataModule + DataLoader, LightningModule with per-step seeding and the non-finite check, TensorBoard logging every
10 steps, EMA, checkpoint callbacks); only the picture callback is off (it runs once per epoch, not per step) and
the progress bar (callbacks.samples=null).

Fairness: both arms run in this one process, on the same device (``--device``: the project gets ``trainer=cpu``, or
``trainer=gpu`` with fp32 and a device sync closing every timed step of both arms), with the same
``torch.set_num_threads`` (checked inside each timed step), each run starts with ``--warmup`` untimed steps (oneDNN
primitive creation, allocator growth, Adam's state), so start-up, validation and the final checkpoint are excluded; the
arms alternate bare, project, bare, project, ... for ``--rounds`` rounds (>= 5 outside ``--smoke``), each run is the
median of its timed steps, and the figures are the medians over the rounds. A ratio project/bare above 1.05 means the
comparison is still off (the framework cannot be faster than the loop it wraps); below 0.95 is overhead to explain.

Each network's row also gives its training GFLOP per image (forward + backward, ``FlopCounterMode``) and so its
GFLOP/s, as a fraction of the CPU's fp32 GEMM limit measured at the start (``common.machine``).

    python benchmarks/train_overhead.py                       # adm_fast (the preset), adm_small, DiffUNet, batch 64
    python benchmarks/train_overhead.py --quick               # adm_fast and DiffUNet (batch 16), ~5 minutes on 2 cores
    python benchmarks/train_overhead.py --quick --smoke       # seconds (CI): tiny network, synthetic data
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddpm_lightning.mnist import load_mnist_split  # noqa: E402
from ddpm_lightning.schedule import NoiseSchedule  # noqa: E402
from ddpm_lightning.training import train  # noqa: E402

from common import DEFAULT_DATA_ROOT, machine, mnist_root, result_path, training_gflop_per_image  # noqa: E402


class StepTimer(L.Callback):
    """Wall time from one training batch start to the next (the full cost of a step, data loading included); the
    last step ends at its ``on_train_batch_end`` (after it come the epoch-end checkpoint and validation)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.threads: set[int] = set()
        self.devices: set[str] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.threads.add(torch.get_num_threads())
        self.devices.add(pl_module.device.type)
        _sync(pl_module.device)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], self.ends[-1]], strict=True)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def bare_loop(
    model_cfg, root: str, batch_size: int, steps: int, warmup: int, lr: float, threads: int, device: str = "cpu"
) -> float:
    """Images/s of the bare loop on ``device``: the median of ``steps`` timed steps after ``warmup`` untimed ones."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    net = instantiate(model_cfg).train().to(dev)
    images, _ = load_mnist_split(root, train=True)  # uint8 (N, 1, 32, 32), in host memory, as the DataModule's
    schedule = NoiseSchedule().to(dev)
    sqrt_ab = schedule.alphas_cumprod.sqrt().float()
    sqrt_1m_ab = (1 - schedule.alphas_cumprod).sqrt().float()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    times = []
    for i in range(warmup + steps):
        if torch.get_num_threads() != threads:
            raise RuntimeError(f"thread count changed to {torch.get_num_threads()} (expected {threads})")
        start = time.perf_counter()
        idx = torch.randint(0, images.shape[0], (batch_size,))
        x0 = images[idx].to(dev).float().div_(127.5).sub_(1.0)
        t = torch.randint(0, schedule.num_timesteps, (batch_size,), device=dev)
        eps = torch.randn_like(x0)
        x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_ab[t].view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(net(x_t, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def project_run(
    model: str, root: str, batch_size: int, steps: int, warmup: int, run_dir: Path, threads: int, device: str = "cpu"
) -> float:
    """Images/s of ``ddpm-train`` on ``device``: the median of ``steps`` timed steps after ``warmup`` untimed ones."""
    torch.set_num_threads(threads)
    trainer = ["trainer=cpu"] if device == "cpu" else ["trainer=gpu", "trainer.precision=32-true"]
    cfg = compose_train(
        [
            *trainer,
            f"model={model}",
            f"data.root={root}",
            f"data.batch_size={batch_size}",
            f"trainer.max_steps={warmup + steps}",
            "trainer.enable_progress_bar=false",
            "data.val_size=64",
            "callbacks.samples=null",
            f"run_dir={run_dir}",
            "overwrite=true",
        ]
    )
    with open_dict(cfg):
        cfg.callbacks.timer = {"_target_": f"{__name__}.StepTimer"}
    result = train(cfg)
    timer = next(c for c in result["trainer"].callbacks if isinstance(c, StepTimer))
    if timer.threads != {threads}:
        raise RuntimeError(f"ddpm-train ran with {sorted(timer.threads)} threads (expected {threads})")
    if timer.devices != {torch.device(device).type}:
        raise RuntimeError(f"ddpm-train ran on {sorted(timer.devices)} (expected {device}, as the bare loop)")
    intervals = timer.step_times()[warmup:]
    return batch_size / statistics.median(intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="adm_fast,adm_small,diffunet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (DiffUNet: --diffunet-steps)")
    parser.add_argument("--diffunet-steps", type=int, default=4)
    parser.add_argument(
        "--diffunet-batch-size",
        type=int,
        default=None,
        help="DiffUNet's batch (default: --batch-size; 16 with --quick)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--rounds", type=int, default=5, help="bare/project pairs, alternating (>= 5 unless --smoke)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of both arms")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the device of both arms")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--quick", action="store_true", help="adm_fast (10 steps) and DiffUNet (batch 16, 2 steps)")
    parser.add_argument(
        "--smoke", action="store_true", help="adm_tiny, 2 rounds of 2 steps, synthetic data if needed (CI)"
    )
    parser.add_argument(
        "--json", default=result_path("train_overhead.json"), help="where the JSON goes (default: %(default)s)"
    )
    args = parser.parse_args()
    if args.rounds < 5 and not args.smoke:
        parser.error(f"--rounds={args.rounds}: must be >= 5 (the figures are medians over the rounds)")
    torch.set_num_threads(args.threads)
    info = machine(args.smoke)
    rounds = 2 if args.smoke else args.rounds
    networks = (
        ["adm_tiny"]
        if args.smoke
        else (
            ["adm_fast", "diffunet"]
            if args.quick and args.networks == parser.get_default("networks")
            else args.networks.split(",")
        )
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = mnist_root(args.data_root, args.smoke, Path(tmp), n_train=256)
        for name in networks:
            diffunet = name == "diffunet"
            batch = (
                (args.diffunet_batch_size or (16 if args.quick else args.batch_size)) if diffunet else args.batch_size
            )
            steps = (
                2
                if args.smoke
                else (
                    2
                    if args.quick and diffunet
                    else 10
                    if args.quick
                    else args.diffunet_steps
                    if diffunet
                    else args.steps
                )
            )
            warmup = 1 if (args.smoke or diffunet) else args.warmup
            cfg = compose_train([f"model={name}"])
            gflop = training_gflop_per_image(instantiate(cfg.model))
            bare, proj = [], []
            for r in range(rounds):  # ABAB: drift on a shared machine hits both arms alike
                bare.append(
                    bare_loop(cfg.model, root, batch, steps, warmup, float(cfg.optimizer.lr), args.threads, args.device)
                )
                proj.append(
                    project_run(name, root, batch, steps, warmup, Path(tmp) / f"run_{name}", args.threads, args.device)
                )
                print(
                    f"  {name} round {r + 1}/{rounds}: bare {bare[-1]:.2f}, ddpm-train {proj[-1]:.2f} images/s",
                    flush=True,
                )
            b, p = statistics.median(bare), statistics.median(proj)
            rows.append(
                dict(
                    network=name,
                    batch_size=batch,
                    timed_steps=steps,
                    warmup_steps=warmup,
                    rounds=rounds,
                    threads=args.threads,
                    device=args.device,
                    bare_images_per_s=b,
                    bare_runs=bare,
                    project_images_per_s=p,
                    project_runs=proj,
                    ratio=p / b,
                    round_ratios=[q / a for a, q in zip(bare, proj, strict=True)],
                    gflop_per_image=gflop,
                    project_gflops=p * gflop,
                    fraction_of_fp32_gemm=p * gflop / info["gemm_fp32_gflops"],
                )
            )
    print(
        f"\n{'network':10} {'batch':>5} {'steps':>5} {'bare img/s':>11} {'ddpm-train img/s':>17} {'ratio':>6} "
        f"{'GFLOP/img':>9} {'GFLOP/s':>8} {'of fp32 GEMM':>12}"
    )
    for r in rows:
        print(
            f"{r['network']:10} {r['batch_size']:5d} {r['timed_steps']:5d} {r['bare_images_per_s']:11.2f} "
            f"{r['project_images_per_s']:17.2f} {r['ratio']:6.3f} {r['gflop_per_image']:9.3f} "
            f"{r['project_gflops']:8.1f} "
            f"{r['fraction_of_fp32_gemm']:12.2f}"
        )
        if not 0.95 <= r["ratio"] <= 1.05:
            print(
                f"  {r['network']}: ratio {r['ratio']:.3f} is outside [0.95, 1.05]: a finding to explain "
                f"(per-round ratios {', '.join(f'{x:.2f}' for x in r['round_ratios'])})"
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(machine=info, rows=rows), indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
