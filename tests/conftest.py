"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_fixtures import REAL_MNIST_ROOT, requires_real_mnist, write_fake_mnist  # noqa: F401


@pytest.fixture
def fake_mnist_root(tmp_path: Path) -> Path:
    """A root with tiny valid MNIST IDX files in ``MNIST/raw`` (64 train, 32 test images)."""
    return write_fake_mnist(tmp_path / "data")


@pytest.fixture(scope="session")
def real_mnist_root() -> Path:
    """Root of the real MNIST (``/work/shared/data``); skips the test when it is absent."""
    if not (REAL_MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real MNIST not found under {REAL_MNIST_ROOT}/MNIST/raw")
    return REAL_MNIST_ROOT


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

#: Overrides that make a real composed training run take seconds: the tiny ADMUNet, tiny data, DDIM-4 pictures.
TINY_TRAIN = [
    "model=adm_tiny",
    "data.batch_size=8",
    "data.subset_size=16",
    "data.val_size=8",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.samples.num_samples=4",
    "callbacks.samples.trajectory_samples=2",
    "callbacks.samples.trajectory_frames=3",
    "callbacks.samples.sampler={_target_: ddpm_lightning.samplers.DDIMSampler, steps: 4}",
]


def compose_train(overrides: list[str]):
    """Compose the real ``conf/train.yaml`` with ``overrides`` as ``ddpm-train`` does (one-line errors for unknown
    keys), without running Hydra."""
    from ddpm_lightning.config import compose_config

    return compose_config("train", overrides)


@pytest.fixture
def tiny_train_overrides(fake_mnist_root: Path, tmp_path: Path) -> list[str]:
    """TINY_TRAIN on the fake MNIST, writing into ``tmp_path/run``."""
    return [*TINY_TRAIN, f"data.root={fake_mnist_root}", f"run_dir={tmp_path / 'run'}"]


def run_train_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m ddpm_lightning.cli.train *args`` in ``cwd`` (as a user types ``ddpm-train``), output captured."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ddpm_lightning.cli.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
