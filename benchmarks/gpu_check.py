"""GPU check (issue 26): the phases that ``benchmarks/gpu_check.sh`` runs, one process per phase, each under its own
time limit, on one CUDA GPU; ``--dry-run`` runs the same code on a CPU with a tiny network and a few steps (the test
suite does, so that the script cannot rot).

Every phase appends one JSON line to ``<out>/phases.jsonl``; ``--phase summary`` turns them into
``<out>/gpu_check.json`` and the tables of ``<out>/gpu_check.md``.

Phases:

* ``versions``: torch / CUDA / Lightning / deepinv / Hydra versions, the GPU, and the measured bf16 GEMM peak
  (8192^3 matrix products), the denominator of every MFU below.
* ``steps``: DiffUNet in bf16 at batch 64 and 256: the bare PyTorch step (data on the GPU, q_sample, eps-MSE, backward,
  clipping, Adam) against the real ``ddpm-train`` step (``train()`` with ``trainer=gpu``: DataModule, EMA, logging,
  the non-finite guard, checkpoint callbacks), images/s, MFU (18.17 GFLOP per training image, ``FlopCounterMode``),
  peak memory; also the project with ``data.on_device=true``.
* ``variants``: the bare step at batch 256 with the fused Adam, channels_last and ``torch.compile``; the project step
  with ``optimizer.fused=true`` and with ``model.compile=true``.
* ``census``: ``tests/test_syncs.py`` on CUDA (``set_sync_debug_mode("error")`` over the steady steps of every preset)
  and the syncs per step of the real DiffUNet step counted with ``set_sync_debug_mode("warn")``.
* ``sampling``: DDIM-50, SDE-DPM-Solver++(2M)-20 and DDPM-1000 with DiffUNet, fp32 and bf16, images/s (after a
  warm-up call).
* ``train``: a short real ``ddpm-train`` run (DiffUNet, bf16, batch 256, ``trainer.max_time``) with its end-of-run
  FID of 1,000 SDE-DPM-Solver++-20 samples.
* ``summary``: the projected wall time of the default 100-epoch plan (60,000 images, batch 64, one grid per epoch)
  and the markdown tables.

    benchmarks/gpu_check.sh "$OUT"                 # on the GPU machine (see the .sh for the wheels and MNIST)
    python benchmarks/gpu_check.py --phase steps --out DIR [--dry-run]
    python benchmarks/gpu_check.py --smoke --json FILE                     # the old one-process smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DEFAULT_OUT = str(REPO / "benchmarks" / "results" / "gpu_check")
PLAN_IMAGES = 100 * 60_000  #: the default plan: 100 epochs over the 60,000 training images
DIFFUNET_TRAIN_GFLOP = 18.17  #: per training image (forward + backward), FlopCounterMode; recomputed when possible


# --------------------------------------------------------------------------------------------------- helpers
class Setup:
    """What a phase runs on: the device, the network config name, the precision and the sizes (real or dry run)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dry = bool(args.dry_run)
        self.cuda = torch.cuda.is_available()
        if not self.cuda and not self.dry:
            raise SystemExit("error: no CUDA GPU visible (torch.cuda.is_available() is False); use --dry-run on a CPU")
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.model = "adm_tiny" if self.dry else "diffunet"
        self.bf16 = self.cuda  # bf16 autocast on the GPU; fp32 on a CPU (bf16 is slow there)
        self.batches = [4] if self.dry else [64, 256]
        self.steps, self.warmup = (3, 1) if self.dry else (30, 8)
        self.data_root = args.data_root
        self.out = Path(args.out)
        self.trainer = "trainer=cpu" if not self.cuda else "trainer=gpu"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def net_config(model: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"model={model}"]).model


def build_net(model: str) -> torch.nn.Module:
    from ddpm_lightning.config import build

    return build(net_config(model), key="model")


def train_gflop(model: str) -> float:
    try:
        from common import training_gflop_per_image

        return training_gflop_per_image(build_net(model))
    except Exception:
        return DIFFUNET_TRAIN_GFLOP


def peak_tflops(out: Path) -> float | None:
    """The measured bf16 GEMM peak of the ``versions`` phase (TFLOP/s), if it ran."""
    for record in read_phases(out):
        if record.get("phase") == "versions" and record.get("gemm_bf16_tflops"):
            return record["gemm_bf16_tflops"]
    return None


def read_phases(out: Path) -> list[dict]:
    path = out / "phases.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_phase(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "phases.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1)[:4000], flush=True)


def compose_train(overrides: list[str]):
    from ddpm_lightning.config import compose_config

    return compose_config("train", overrides)


# --------------------------------------------------------------------------------------------------- versions
def phase_versions(s: Setup) -> dict:
    import lightning

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "cpus": os.cpu_count(),
        "device": str(s.device),
    }
    for name in ("deepinv", "hydra", "omegaconf", "torchvision", "torchmetrics"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:
            info[name] = f"missing: {err}"
    if s.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=list(torch.cuda.get_device_capability()),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    n, reps = (512, 3) if s.dry else (8192, 20)
    dtype = torch.bfloat16 if s.cuda else torch.float32
    a = torch.randn(n, n, device=s.device, dtype=dtype)
    b = torch.randn(n, n, device=s.device, dtype=dtype)
    for _ in range(3):
        a @ b
    s.sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    s.sync()
    info["gemm_n"] = n
    info["gemm_bf16_tflops" if s.cuda else "gemm_fp32_tflops"] = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    return info


# --------------------------------------------------------------------------------------------------- steps
def bare_step_ips(
    s: Setup,
    batch: int,
    fused: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    steps: int | None = None,
) -> dict:
    """Images/s of the bare loop: the network, q_sample, the eps-MSE, backward, clipping at 1.0 and Adam, on data
    already on the device, timed over ``steps`` steps after a warm-up (one sync at each end)."""
    from ddpm_lightning.mnist import load_mnist_split
    from ddpm_lightning.schedule import NoiseSchedule

    if s.cuda:
        torch.cuda.empty_cache()  # what the previous arm left
    torch.manual_seed(0)
    net = build_net(s.model).to(s.device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile:  # the dry run only proves the path: dynamo without inductor's minutes of C++ on a CPU
        net.compile(**({"backend": "eager"} if s.dry else {}))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True if fused else None)
    images, _ = load_mnist_split(s.data_root, train=True)
    images = images.to(s.device)
    schedule = NoiseSchedule().to(s.device)
    sqrt_ab = schedule.alphas_cumprod.sqrt().float()
    sqrt_1m = (1 - schedule.alphas_cumprod).sqrt().float()
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16)
    steps = steps or s.steps

    def step() -> None:
        idx = torch.randint(0, images.shape[0], (batch,), device=s.device)
        x0 = images[idx].float().div_(127.5).sub_(1.0)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (batch,), device=s.device)
        eps = torch.randn_like(x0)
        x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1m[t].view(-1, 1, 1, 1) * eps
        with autocast:
            out = net(x_t, t)
        loss = torch.nn.functional.mse_loss(out.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    start = time.perf_counter()
    for _ in range(s.warmup if not compile else s.warmup + 2):
        step()
    s.sync()
    warm_s = time.perf_counter() - start
    if s.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    s.sync()
    elapsed = time.perf_counter() - start
    result = {"images_per_s": batch * steps / elapsed, "ms_per_step": 1000 * elapsed / steps, "warmup_s": warm_s}
    if s.cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


class WindowTimer:
    """A Lightning callback: wall time from the start of step ``first`` to the start of step ``last`` (a device sync at
    each of the two, none in between), and the peak memory over that window."""

    def __new__(cls, first: int, last: int):
        import lightning as L

        class _Timer(L.Callback):
            window_timer = True

            def __init__(self) -> None:
                self.start = self.end = self.peak = None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                step = trainer.global_step
                if step in (first, last):
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    if step == first:
                        self.start = time.perf_counter()
                        if torch.cuda.is_available():
                            torch.cuda.reset_peak_memory_stats()
                    else:
                        self.end = time.perf_counter()
                        self.peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None

        return _Timer()


def project_ips(
    s: Setup,
    batch: int,
    extra: list[str] = (),
    steps: int | None = None,
    callbacks: dict | None = None,
    log_every: int = 50,
) -> dict:
    """Images/s of ``ddpm-train`` (``train()`` with the real configs) over ``steps`` steps after the warm-up."""
    from omegaconf import open_dict

    from ddpm_lightning.training import train

    steps = steps or s.steps
    first, last = s.warmup, s.warmup + steps
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train(
            [
                f"model={s.model}",
                s.trainer,
                f"data.root={s.data_root}",
                f"data.batch_size={batch}",
                f"trainer.max_steps={last + 1}",
                "trainer.max_epochs=-1",
                "trainer.enable_progress_bar=false",
                "data.val_size=64",
                "trainer.val_check_interval=null",
                "trainer.check_val_every_n_epoch=1000",
                "callbacks.samples=null",
                f"trainer.log_every_n_steps={log_every}",
                f"run_dir={tmp}/run",
                *(["trainer.precision=32-true"] if not s.cuda else []),
                *extra,
            ]
        )
        with open_dict(cfg):
            cfg.callbacks.window = {"_target_": f"{__name__}.WindowTimer", "first": first, "last": last}
            for name, node in (callbacks or {}).items():
                cfg.callbacks[name] = node
        start = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - start
        timer = next(c for c in result["trainer"].callbacks if getattr(c, "window_timer", False))
        elapsed = timer.end - timer.start
        out = {
            "images_per_s": batch * steps / elapsed,
            "ms_per_step": 1000 * elapsed / steps,
            "run_wall_s": wall,
            "precision": str(cfg.trainer.precision),
        }
        if timer.peak is not None:
            out["peak_memory_gib"] = timer.peak
        extra_out = {c.name: c.report() for c in result["trainer"].callbacks if getattr(c, "gpu_check_report", False)}
        out.update(extra_out)
    if s.cuda:
        torch.cuda.empty_cache()
    return out


def phase_steps(s: Setup) -> dict:
    gflop = train_gflop(s.model)
    peak = peak_tflops(s.out)
    rows = []
    for batch in s.batches:
        bare = bare_step_ips(s, batch)
        proj = project_ips(s, batch)
        on_dev = project_ips(s, batch, ["data.on_device=true"])
        row = {
            "batch": batch,
            "bare": bare,
            "project": proj,
            "project_on_device": on_dev,
            "ratio": proj["images_per_s"] / bare["images_per_s"],
            "ratio_on_device": on_dev["images_per_s"] / bare["images_per_s"],
        }
        for key in ("bare", "project", "project_on_device"):
            row[key]["tflops"] = row[key]["images_per_s"] * gflop / 1e3
            if peak:
                row[key]["mfu"] = row[key]["tflops"] / peak
        rows.append(row)
        print(
            f"batch {batch}: bare {bare['images_per_s']:.0f}, ddpm-train {proj['images_per_s']:.0f} "
            f"({row['ratio']:.3f}), on_device {on_dev['images_per_s']:.0f} images/s",
            flush=True,
        )
    return {"network": s.model, "bf16": s.bf16, "train_gflop_per_image": gflop, "peak_tflops": peak, "rows": rows}


# --------------------------------------------------------------------------------------------------- variants
def phase_variants(s: Setup) -> dict:
    batch = s.batches[-1]
    rows = {}
    for name, kwargs in (
        ("baseline", {}),
        ("fused_adam", {"fused": True}),
        ("channels_last", {"channels_last": True}),
        ("compile", {"compile": True}),
    ):
        try:
            rows[f"bare {name}"] = bare_step_ips(s, batch, **kwargs)
        except Exception as err:
            rows[f"bare {name}"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(name, rows[f"bare {name}"], flush=True)
    projects = [("project fused_adam", ["optimizer.fused=true"])]
    if not s.dry:  # inductor on a CPU takes minutes
        projects.append(("project compile+fused", ["model.compile=true", "optimizer.fused=true"]))
    for name, extra in projects:
        try:
            rows[name] = project_ips(s, batch, extra)
        except Exception as err:
            rows[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(name, rows[name], flush=True)
    return {"batch": batch, "rows": rows}


# --------------------------------------------------------------------------------------------------- census
class SyncCount:
    """A Lightning callback that counts the syncs of each step with ``torch.cuda.set_sync_debug_mode("warn")`` (one
    UserWarning per sync), from the start of step ``first``; on a CPU it counts with the Python census instead."""

    def __new__(cls, first: int, every: int):
        import lightning as L

        from ddpm_lightning.sync_census import SyncCensus

        class _Count(L.Callback):
            name = "syncs"
            gpu_check_report = True

            def __init__(self) -> None:
                self.counts: dict[int, int] = {}
                self._census = None
                self._ctx = None

            def _close(self) -> None:
                if self._ctx is not None:
                    self._ctx.__exit__(None, None, None)
                    self._ctx = None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                step = trainer.global_step
                if step < first:
                    return
                if self._ctx is None:
                    if torch.cuda.is_available():
                        self._ctx = _CudaWarnCounter(self)
                    else:
                        self._census = SyncCensus()
                        self._ctx = self._census
                    self._ctx.__enter__()
                self.step = step
                if self._census is not None:
                    self._census.label = step

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                self._close()

            def on_train_end(self, trainer, pl_module) -> None:
                self._close()

            def add(self, n: int = 1) -> None:
                self.counts[self.step] = self.counts.get(self.step, 0) + n

            def report(self) -> dict:
                self._close()
                if self._census is not None:
                    for e in self._census.events:
                        if isinstance(e.label, int):
                            self.counts[e.label] = self.counts.get(e.label, 0) + 1
                steps = sorted(k for k in self.counts)
                last = max(steps) if steps else first
                per_step = {k: self.counts.get(k, 0) for k in range(first, last)}
                check = [k for k in per_step if (k + 1) % every == 0]
                steady = [k for k in per_step if (k + 1) % every]
                return {
                    "per_step": per_step,
                    "check_every": every,
                    "steady_step_syncs_max": max((per_step[k] for k in steady), default=0),
                    "check_step_syncs_max": max((per_step[k] for k in check), default=0),
                }

        return _Count()


class _CudaWarnCounter:
    def __init__(self, owner) -> None:
        self.owner = owner

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._previous = warnings.showwarning
        owner = self.owner

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                owner.add()

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self._previous
        self._catch.__exit__(*exc)


def phase_census(s: Setup) -> dict:
    result: dict = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    test = str(REPO / "tests" / "test_syncs.py")
    k = ["-k", "cuda"] if s.cuda else []
    if not s.cuda:  # the dry run: one preset on the CPU
        test += "::test_a_steady_training_step_and_sampler_step_have_no_host_sync[mnist_cpu-cpu]"
    # -o addopts=: not the repo's -n auto (pytest-xdist may not be installed here, and one test needs no workers)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", test, *k],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    result["test_syncs"] = {
        "returncode": proc.returncode,
        "selection": "cuda" if s.cuda else "mnist_cpu-cpu",
        "tail": (proc.stdout + proc.stderr).strip().splitlines()[-3:],
    }
    every = 10
    result["real_step"] = project_ips(
        s,
        s.batches[0],
        steps=2 * every if not s.dry else 4,
        log_every=every,
        callbacks={"syncs": {"_target_": f"{__name__}.SyncCount", "first": s.warmup, "every": every}},
    )
    return result


# --------------------------------------------------------------------------------------------------- sampling
def phase_sampling(s: Setup) -> dict:
    from ddpm_lightning.module import DDPM
    from ddpm_lightning.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler
    from ddpm_lightning.schedule import NoiseSchedule

    n = 2 if s.dry else 256
    samplers = {
        "DDIM-50": DDIMSampler(steps=2 if s.dry else 50),
        "SDE-DPM-Solver++-20": DPMSolverSampler(steps=2 if s.dry else 20, algorithm="sde-dpmsolver++"),
        "DDPM-1000": DDPMSampler(steps=4 if s.dry else None),
    }
    torch.manual_seed(0)
    model = DDPM(build_net(s.model), NoiseSchedule()).to(s.device).eval()
    rows = []
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        for name, sampler in samplers.items():
            generator = torch.Generator(s.device).manual_seed(0)
            with autocast:
                model.sample(n, generator=generator, sampler=DDIMSampler(steps=2))  # warm-up (kernels, allocator)
                s.sync()
                start = time.perf_counter()
                x0 = model.sample(n, generator=generator, sampler=sampler).x0
                s.sync()
            elapsed = time.perf_counter() - start
            rows.append(
                {
                    "sampler": name,
                    "precision": precision,
                    "num_samples": n,
                    "seconds": elapsed,
                    "images_per_s": n / elapsed,
                    "finite": bool(torch.isfinite(x0).all()),
                }
            )
            print(rows[-1], flush=True)
    return {"network": s.model, "rows": rows}


# --------------------------------------------------------------------------------------------------- train
def phase_train(s: Setup, budget_s: float) -> dict:
    from ddpm_lightning.training import train

    minutes = max(0.5, (budget_s - 60) / 60) if not s.dry else 0.05
    mins, secs = divmod(int(minutes * 60), 60)
    with tempfile.TemporaryDirectory() as tmp:
        over = [
            f"model={s.model}",
            s.trainer,
            f"data.root={s.data_root}",
            f"data.batch_size={4 if s.dry else 256}",
            "optimizer.lr=2e-4",
            "trainer.max_epochs=-1",
            f"trainer.max_steps={6 if s.dry else 100000}",
            f"++trainer.max_time='00:00:{mins:02d}:{secs:02d}'",
            "trainer.enable_progress_bar=false",
            f"data.val_size={16 if s.dry else 256}",
            "trainer.val_check_interval=null",
            "trainer.check_val_every_n_epoch=1000",
            "sampler=sde_dpmpp",
            "callbacks.samples.num_samples=16",
            f"run_dir={tmp}/run",
            "trainer.log_every_n_steps=50",
            "++evaluate.num_samples=" + ("8" if s.dry else "1000"),
            "++evaluate.batch_size=" + ("8" if s.dry else "500"),
            *(["data.subset_size=64", "trainer.precision=32-true", "++evaluate.sampler.steps=2"] if s.dry else []),
        ]
        start = time.perf_counter()
        result = train(compose_train(over))
        wall = time.perf_counter() - start
        trainer = result["trainer"]
        evaluation = result.get("evaluation") or {}
    return {
        "network": s.model,
        "max_time_min": round(minutes, 2),
        "steps": trainer.global_step,
        "images": trainer.global_step * (4 if s.dry else 256),
        "wall_s": wall,
        "fid": evaluation.get("fid"),
        "confident_fraction": evaluation.get("confident_fraction"),
        "val_loss": result["metrics"].get("val/loss"),
    }


# --------------------------------------------------------------------------------------------------- summary
def phase_summary(out: Path) -> dict:
    records = {r["phase"]: r for r in read_phases(out)}
    summary: dict = {"phases": {name: r.get("status", "ok") for name, r in records.items()}}
    ok = {name: r for name, r in records.items() if r.get("status") == "ok"}
    steps = ok.get("steps", {})
    sampling = ok.get("sampling", {})
    by_batch = {row["batch"]: row for row in steps.get("rows", [])}
    fast = next(
        (r for r in sampling.get("rows", []) if r["sampler"].startswith("SDE") and r["precision"] == "fp32"), None
    )
    plan = {}
    for batch, row in by_batch.items():
        ips = row["project"]["images_per_s"]
        grid_s = 64 / fast["images_per_s"] if fast else 0.0  # one 64-image picture per epoch (fp32, as the callback)
        plan[batch] = {
            "train_s": PLAN_IMAGES / ips,
            "grids_s": 100 * grid_s,
            "total_min": (PLAN_IMAGES / ips + 100 * grid_s) / 60,
        }
    summary["plan_100_epochs"] = plan
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"summary": summary, "phases": records}, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(records, summary))
    return summary


def markdown(records: dict, summary: dict) -> str:
    records = {name: r for name, r in records.items() if r.get("status") == "ok"}  # a timed-out phase has no figures
    v = records.get("versions", {})
    gemm = v.get("gemm_bf16_tflops") or v.get("gemm_fp32_tflops") or float("nan")
    lines = [
        "# GPU check",
        "",
        f"{v.get('gpu', v.get('device', '?'))}, torch {v.get('torch')}, CUDA {v.get('cuda')}, "
        f"Lightning {v.get('lightning')}, deepinv {v.get('deepinv')}; measured GEMM peak "
        f"{gemm:.3g} TFLOP/s ({'bf16' if v.get('gemm_bf16_tflops') else 'fp32, CPU'}).",
        "",
        "| phase | status |",
        "|---|---|",
    ]
    lines += [f"| {name} | {status} |" for name, status in summary["phases"].items()]
    steps = records.get("steps")
    if steps and steps.get("rows"):
        lines += [
            "",
            f"## Training step ({steps['network']}, {'bf16' if steps['bf16'] else 'fp32'})",
            "",
            "| batch | arm | images/s | ms/step | MFU | peak GiB |",
            "|---|---|---|---|---|---|",
        ]
        for row in steps["rows"]:
            for arm in ("bare", "project", "project_on_device"):
                r = row[arm]
                lines.append(
                    f"| {row['batch']} | {arm} | {r['images_per_s']:.0f} | {r['ms_per_step']:.1f} | "
                    f"{r.get('mfu', float('nan')):.3f} | {r.get('peak_memory_gib', float('nan')):.1f} |"
                )
            lines.append(
                f"| {row['batch']} | project / bare | {row['ratio']:.3f} "
                f"(on_device {row['ratio_on_device']:.3f}) | | | |"
            )
    variants = records.get("variants")
    if variants and variants.get("rows"):
        lines += ["", f"## Variants (batch {variants['batch']})", "", "| variant | images/s | note |", "|---|---|---|"]
        for name, r in variants["rows"].items():
            lines.append(f"| {name} | {r.get('images_per_s', float('nan')):.0f} | {r.get('error', '')} |")
    census = records.get("census")
    if census:
        real = census.get("real_step", {}).get("syncs", {})
        lines += [
            "",
            "## Host syncs",
            "",
            f"tests/test_syncs.py ({census['test_syncs']['selection']}): return code "
            f"{census['test_syncs']['returncode']}; the real step: at most {real.get('steady_step_syncs_max')} "
            f"per steady step, {real.get('check_step_syncs_max')} on a check step "
            f"(every {real.get('check_every')}).",
        ]
    sampling = records.get("sampling")
    if sampling and sampling.get("rows"):
        lines += ["", "## Sampling", "", "| sampler | precision | images/s |", "|---|---|---|"]
        lines += [f"| {r['sampler']} | {r['precision']} | {r['images_per_s']:.1f} |" for r in sampling["rows"]]
    train = records.get("train")
    if train and "steps" in train:
        lines += [
            "",
            "## Short ddpm-train run",
            "",
            f"{train['steps']} steps ({train['images']} images) in "
            f"{train['max_time_min']} min of training, {train['wall_s']:.0f} s in all; end-of-run FID "
            f"{train['fid']}, val/loss {train['val_loss']}.",
        ]
    if summary.get("plan_100_epochs"):
        lines += [
            "",
            "## The 100-epoch plan (60,000 images, one 64-image grid per epoch)",
            "",
            "| batch | training min | grids min | total min |",
            "|---|---|---|---|",
        ]
        for batch, p in summary["plan_100_epochs"].items():
            lines.append(f"| {batch} | {p['train_s'] / 60:.1f} | {p['grids_s'] / 60:.1f} | {p['total_min']:.1f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- smoke
def smoke(args: argparse.Namespace) -> None:
    """The former one-process check (``--smoke``): a few bare steps and DDIM-50 sampling, as JSON."""
    from ddpm_lightning.module import DDPM
    from ddpm_lightning.networks import ADMUNetEps, DiffUNetEps
    from ddpm_lightning.samplers import DDIMSampler
    from ddpm_lightning.schedule import NoiseSchedule

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    net = ADMUNetEps(channel_mult=(1,), attn_resolutions=()) if args.smoke else DiffUNetEps()
    model = DDPM(net, NoiseSchedule()).to(device)
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-4)
    x0 = torch.rand(args.batch_size, 1, 32, 32, device=device) * 2 - 1
    start = time.perf_counter()
    for i in range(2):
        loss = model.training_step(x0, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_ips = 2 * args.batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    model.sample(4, generator=torch.Generator(device=device).manual_seed(0), sampler=DDIMSampler(steps=50))
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "train_images_per_s": train_ips,
        "ddim50_images_per_s": 4 / (time.perf_counter() - start),
        "projected_100_epochs_60k_hours": PLAN_IMAGES / train_ips / 3600,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


PHASES = ("versions", "steps", "variants", "census", "sampling", "train", "summary")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=PHASES, help="the phase to run (benchmarks/gpu_check.sh runs them all)")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="folder of phases.jsonl, gpu_check.json, gpu_check.md (default: %(default)s)"
    )
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"), help="folder holding MNIST/raw")
    parser.add_argument("--dry-run", action="store_true", help="CPU allowed: a tiny network and a few steps")
    parser.add_argument("--budget-s", type=float, default=120.0, help="the phase's time limit (gpu_check.sh sets it)")
    parser.add_argument("--smoke", action="store_true", help="the former one-process check, tiny network (CI)")
    parser.add_argument("--batch-size", type=int, default=64, help="--smoke only")
    parser.add_argument(
        "--json",
        default=str(REPO / "benchmarks" / "results" / "gpu_check.json"),
        help="--smoke only: where its JSON goes (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.smoke:
        smoke(args)
        return
    if args.phase is None:
        parser.error("give --phase (benchmarks/gpu_check.sh runs every phase) or --smoke")
    out = Path(args.out)
    if args.phase == "summary":
        print(json.dumps(phase_summary(out), indent=1))
        return
    s = Setup(args)
    start = time.perf_counter()
    record: dict = {"phase": args.phase, "dry_run": s.dry}
    try:
        if args.phase == "versions":
            record.update(phase_versions(s))
        elif args.phase == "steps":
            record.update(phase_steps(s))
        elif args.phase == "variants":
            record.update(phase_variants(s))
        elif args.phase == "census":
            record.update(phase_census(s))
        elif args.phase == "sampling":
            record.update(phase_sampling(s))
        elif args.phase == "train":
            record.update(phase_train(s, args.budget_s))
        record["status"] = "ok"
    except Exception as err:
        record["status"] = f"failed: {type(err).__name__}: {str(err)[:400]}"
        import traceback

        traceback.print_exc()
    record["seconds"] = time.perf_counter() - start
    append_phase(out, record)
    if record["status"] != "ok":
        raise SystemExit(1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
