"""Peak memory of training and sampling at the default batch sizes (peak RSS; peak GPU memory on a GPU).

Each case runs in its own process (``os.wait4`` gives that child's peak RSS), so cases do not inherit each other's
peaks; ``baseline`` is the same process after importing torch, Lightning and the project, doing nothing.

* ``train <net>``: ``ddpm_lightning.training.train`` (real configs, batch ``data.batch_size``=64), ``--train-steps``
  steps on MNIST, picture callback off.
* ``sample <net>``: ``DDPM.sample`` of ``--sample-batch`` images (ddpm-sample's default batch 256) with DDIM-2
  (memory does not grow with the number of steps).

    python benchmarks/memory.py --data-root ../shared/data
    python benchmarks/memory.py --quick             # adm_small and DiffUNet, fewer steps (~3 minutes on 2 cores)
    python benchmarks/memory.py --quick --smoke     # seconds (CI): adm_tiny, small batches
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_DATA_ROOT, REPO, machine, mnist_root, result_path

_CHILD = r"""
import json, sys, tempfile, torch
sys.path.insert(0, {repo!r})
from hydra import compose, initialize_config_dir
from ddpm_lightning.training import train
from ddpm_lightning.module import DDPM
from ddpm_lightning.samplers import DDIMSampler
from ddpm_lightning.schedule import NoiseSchedule
from hydra.utils import instantiate
kind, net, root, batch, steps = {kind!r}, {net!r}, {root!r}, {batch!r}, {steps!r}
with initialize_config_dir(config_dir={conf!r}, version_base="1.3"):
    cfg = compose(config_name="train", overrides=[f"model={{net}}", f"data.root={{root}}", f"data.batch_size={{batch}}",
        f"trainer.max_steps={{steps}}", "trainer.enable_progress_bar=false", "callbacks.samples=null",
        "data.val_size=64", "trainer.limit_val_batches=1", "run_dir=" + tempfile.mkdtemp()])
if kind == "train":
    train(cfg)
elif kind == "sample":
    DDPM(instantiate(cfg.model), NoiseSchedule()).sample(batch, sampler=DDIMSampler(steps=2))
gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
print("PEAK_GPU_GIB", json.dumps(gpu))
"""


def run_case(kind: str, net: str, root: str, batch: int, steps: int) -> dict:
    code = _CHILD.format(
        repo=str(REPO), conf=str(REPO / "conf"), kind=kind, net=net, root=root, batch=batch, steps=steps
    )
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {net} failed:\n{text[-3000:]}")
    gpu = json.loads(text.rsplit("PEAK_GPU_GIB", 1)[1].split("\n", 1)[0])
    return dict(
        case=f"{kind} {net}" if kind != "baseline" else "baseline",
        batch_size=batch if kind != "baseline" else None,
        peak_rss_gib=usage.ru_maxrss / 2**20,
        peak_gpu_gib=gpu,
    )  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--networks", default="adm_small,diffunet")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 training step, DiffUNet sampling at batch 64")
    parser.add_argument("--smoke", action="store_true", help="adm_tiny, batch 8, synthetic data if needed (CI)")
    parser.add_argument("--json", default=result_path("memory.json"), help="where the JSON goes (default: %(default)s)")
    args = parser.parse_args()
    info = machine(args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        root = mnist_root(args.data_root, args.smoke, Path(tmp), n_train=64)
        nets = ["adm_tiny"] if args.smoke else args.networks.split(",")
        steps = 1 if (args.quick or args.smoke) else args.train_steps
        rows = [run_case("baseline", nets[0], root, 1, 1)]
        for net in nets:
            train_batch = 8 if args.smoke else args.train_batch
            sample_batch = 8 if args.smoke else (64 if args.quick and net == "diffunet" else args.sample_batch)
            rows.append(run_case("train", net, root, train_batch, steps))
            rows.append(run_case("sample", net, root, sample_batch, steps))
    print(f"{'case':20} {'batch':>5} {'peak RSS GiB':>13} {'peak GPU GiB':>13}")
    for r in rows:
        gpu = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        print(f"{r['case']:20} {r['batch_size'] or '':>5} {r['peak_rss_gib']:13.2f} {gpu:>13}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(machine=info, rows=rows), indent=2))


if __name__ == "__main__":
    main()
