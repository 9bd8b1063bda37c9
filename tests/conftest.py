"""Shared pytest fixtures."""

from __future__ import annotations

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
