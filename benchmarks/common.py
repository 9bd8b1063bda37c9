"""Pieces shared by the benchmark scripts: the networks by name, the zero-init fix and the MNIST root."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ddpm_lightning.networks import ADMUNetEps, DiffUNetEps

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = str(REPO.parent / "shared" / "data")

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
