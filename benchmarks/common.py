"""Pieces shared by the benchmark scripts: the networks by name, the zero-init fix, the MNIST root, where results go,
and what machine they were measured on (CPU model and flags, threads, this CPU's measured GEMM limit)."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ddpm_lightning.networks import ADMUNetEps, DiffUNetEps

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = str(REPO.parent / "shared" / "data")
RESULTS = REPO / "benchmarks" / "results"
# The CPU flags that decide which kernels oneDNN can use (fp32 AVX2 / AVX-512, native bf16, AMX tiles).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")

NETS: dict[str, Callable[[], nn.Module]] = {
    "adm_small": lambda: ADMUNetEps(),
    "adm_fast": lambda: ADMUNetEps(patch_size=2, dropout=0.0),  # conf/model/adm_fast.yaml
    "diffunet": lambda: DiffUNetEps(),
    "adm_tiny": lambda: ADMUNetEps(channel_mult=(1,), attn_resolutions=()),
}


def randomize_zero_init(net: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise the weight tensors that are all zero (zero-initialised residual branches) with N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return net


def mnist_root(requested: str, smoke: bool, tmp: Path, n_train: int) -> str:
    """``requested`` when it holds MNIST/raw; with ``smoke``, else a synthetic MNIST of ``n_train`` images in ``tmp``
    (the tests' IDX writer); otherwise exit with a one-line hint."""
    if (Path(requested) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return requested
    if not smoke:
        raise SystemExit(f"no MNIST under {requested}/MNIST/raw: pass --data-root (or --smoke for synthetic data)")
    sys.path.insert(0, str(REPO / "tests"))
    from mnist_fixtures import write_fake_mnist

    return str(write_fake_mnist(tmp / "data", n_train=n_train, n_test=64))


def result_path(name: str) -> str:
    """The default ``--json`` of a benchmark: ``benchmarks/results/<name>`` (never the current folder)."""
    return str(RESULTS / name)


def cpu_info() -> dict:
    """CPU model, the :data:`CPU_FLAGS` it has, logical CPUs, torch's intra-op threads and versions (Linux
    ``/proc/cpuinfo``; elsewhere the model falls back to ``platform.processor()`` and the flags are empty)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return dict(
        cpu_model=model,
        cpu_flags=[f for f in CPU_FLAGS if f in flags],
        logical_cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
    )


def gemm_gflops(n: int = 4096, dtype: torch.dtype = torch.float32, reps: int = 3) -> float:
    """Median GFLOP/s of an ``n x n`` by ``n x n`` matrix product (2 n^3 FLOP) on the CPU with torch's current
    thread count, after one untimed warm-up (or from that one product alone when it took over 5 s): the practical
    compute limit that a network's training speed is compared with."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    start = time.perf_counter()
    torch.mm(a, b)
    first = time.perf_counter() - start
    if first > 5.0:  # a dtype without fast kernels here (bf16 on a CPU without AVX512-BF16): one product is enough
        return 2 * n**3 / first / 1e9
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def machine(smoke: bool = False) -> dict:
    """:func:`cpu_info` plus the fp32 and bf16 GEMM limits (4096^2; 512^2 with ``smoke``), printed in two lines."""
    info = cpu_info()
    n = 512 if smoke else 4096
    info.update(
        gemm_n=n, gemm_fp32_gflops=gemm_gflops(n, torch.float32), gemm_bf16_gflops=gemm_gflops(n, torch.bfloat16)
    )
    print(
        f"machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} with "
        f"{info['torch_threads']} threads; flags: {' '.join(info['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}"
    )
    print(
        f"GEMM limit ({n}x{n}): fp32 {info['gemm_fp32_gflops']:.0f} GFLOP/s, "
        f"bf16 {info['gemm_bf16_gflops']:.0f} GFLOP/s",
        flush=True,
    )
    return info


def training_gflop_per_image(net: nn.Module, image_size: int = 32, channels: int = 1, batch_size: int = 4) -> float:
    """GFLOP of one training image through ``net``: forward and backward of the eps-MSE, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions; element-wise work is not
    counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch_size, channels, image_size, image_size)
    t = torch.randint(0, 1000, (batch_size,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(net(x, t), x).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size / 1e9


def write_rows(path: str | Path, header: dict, rows: list[dict]) -> None:
    """``{**header, "rows": rows}`` as indented JSON at ``path`` (folders created), rewritten after every arm so that an
    interrupted sweep keeps what it measured."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
