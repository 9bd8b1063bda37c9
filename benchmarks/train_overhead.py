"""Training overhead: a full ``ddpm-train`` step vs a bare PyTorch loop with the same network, batch and optimizer.

The bare loop is the lower bound: in-memory uint8 MNIST, a random batch, q_sample, the epsilon-MSE, backward,
gradient clipping at 1.0 and Adam. The project's step is ``ddpm_lightning.training.train`` with the real configs
(DataModule + DataLoader, LightningModule with per-step seeding and the non-finite check, TensorBoard logging every
10 steps, EMA, checkpoint callbacks); only the picture callback is off (it runs once per epoch, not per step) and
the progress bar (callbacks.samples=null). Steps are timed between consecutive ``on_train_batch_start`` calls after ``--warmup`` steps, so
start-up, validation and the final checkpoint are excluded. Bare and project runs alternate (bare, project, bare
for adm_small) and the ratio project/bare images/s is reported; the target is >= 0.95.

    python benchmarks/train_overhead.py                       # adm_small and DiffUNet, batch 64
    python benchmarks/train_overhead.py --quick               # ~4 minutes on 2 CPU cores
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

from common import DEFAULT_DATA_ROOT, mnist_root  # noqa: E402
from ddpm_lightning.mnist import load_mnist_split  # noqa: E402
from ddpm_lightning.schedule import NoiseSchedule  # noqa: E402
from ddpm_lightning.training import train  # noqa: E402


class StepTimer(L.Callback):
    """Wall time from one training batch start to the next (the full cost of a step, data loading included); the
    last step ends at its ``on_train_batch_end`` (after it come the epoch-end checkpoint and validation)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], self.ends[-1]])]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def bare_loop(model_cfg, root: str, batch_size: int, steps: int, warmup: int, lr: float) -> float:
    """Images/s of the bare loop (median step time over ``steps`` timed steps)."""
    torch.manual_seed(0)
    net = instantiate(model_cfg).train()
    images, _ = load_mnist_split(root, train=True)  # uint8 (N, 1, 32, 32), in memory
    schedule = NoiseSchedule()
    sqrt_ab = schedule.alphas_cumprod.sqrt().float()
    sqrt_1m_ab = (1 - schedule.alphas_cumprod).sqrt().float()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        idx = torch.randint(0, images.shape[0], (batch_size,))
        x0 = images[idx].float().div_(127.5).sub_(1.0)
        t = torch.randint(0, schedule.num_timesteps, (batch_size,))
        eps = torch.randn_like(x0)
        x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_ab[t].view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(net(x_t, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def project_run(model: str, root: str, batch_size: int, steps: int, warmup: int, run_dir: Path, extra: list[str]) -> float:
    """Images/s of ``ddpm-train`` (median step time over ``steps`` timed steps)."""
    cfg = compose_train([f"model={model}", f"data.root={root}", f"data.batch_size={batch_size}",
                         f"trainer.max_steps={warmup + steps}", "trainer.enable_progress_bar=false", "data.val_size=64",
                         "callbacks.samples=null", f"run_dir={run_dir}", *extra])
    with open_dict(cfg):
        cfg.callbacks.timer = {"_target_": f"{__name__}.StepTimer"}
    result = train(cfg)
    timer = next(c for c in result["trainer"].callbacks if isinstance(c, StepTimer))
    intervals = timer.step_times()[warmup:]
    return batch_size / statistics.median(intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="adm_small,diffunet")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (DiffUNet: --diffunet-steps)")
    parser.add_argument("--diffunet-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--quick", action="store_true", help="fewer steps (adm_small 15, DiffUNet 3 at batch 32)")
    parser.add_argument("--smoke", action="store_true", help="adm_tiny, 2 steps, synthetic data if needed (CI)")
    parser.add_argument("--json", default="train_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = mnist_root(args.data_root, args.smoke, Path(tmp), n_train=256)
        plan = [("adm_tiny", args.batch_size, 2, 1)] if args.smoke else [
            (name, args.batch_size if not (args.quick and name == "diffunet") else 32,
             (args.diffunet_steps if name == "diffunet" else args.steps) if not args.quick else (3 if name == "diffunet" else 15),
             args.warmup if name != "diffunet" else 1)
            for name in args.networks.split(",")
        ]
        for name, batch, steps, warmup in plan:
            model_cfg = compose_train([f"model={name}"]).model
            bare = [bare_loop(model_cfg, root, batch, steps, warmup, lr=1e-4)]
            proj = project_run(name, root, batch, steps, warmup, Path(tmp) / f"run_{name}", [])
            if name != "diffunet":  # a second bare run brackets the project run (drift on a noisy machine)
                bare.append(bare_loop(model_cfg, root, batch, steps, warmup, lr=1e-4))
            bare_ips = statistics.mean(bare)
            rows.append(dict(network=name, batch_size=batch, timed_steps=steps, bare_images_per_s=bare_ips,
                             bare_runs=bare, project_images_per_s=proj, ratio=proj / bare_ips))
    print(f"{'network':10} {'batch':>5} {'steps':>5} {'bare img/s':>11} {'ddpm-train img/s':>17} {'ratio':>6}")
    for r in rows:
        print(f"{r['network']:10} {r['batch_size']:5d} {r['timed_steps']:5d} {r['bare_images_per_s']:11.2f} "
              f"{r['project_images_per_s']:17.2f} {r['ratio']:6.3f}")
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
