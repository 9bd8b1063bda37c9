"""Test helpers: tiny synthetic MNIST IDX files, an IDX reader, and the real-MNIST location.

The fake files use the genuine IDX layout (big-endian int32 header, uint8 payload) in
torchvision's directory layout ``<root>/MNIST/raw/``, just with fewer images, so the
code under test cannot tell them from the real thing except by their counts.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

#: Directory containing ``MNIST/raw`` with the real dataset (repo is /work/main, data is
#: /work/shared/data/MNIST/raw).
REAL_MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"

requires_real_mnist = pytest.mark.skipif(
    not (REAL_MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason=f"real MNIST not found under {REAL_MNIST_ROOT}/MNIST/raw",
)

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049

FILE_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def make_fake_digits(n: int, seed: int) -> np.ndarray:
    """``n`` random digit-like 28x28 uint8 images: 2-4 bright Gaussian blobs on faint noise.

    Every pixel, edges included, is usually non-zero (the noise floor is 1..20), so a
    test can tell the added zero padding from the digit's own border. Each image has at
    least one 255 pixel.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        img = np.zeros((28, 28))
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0, 27, size=2)
            sigma = rng.uniform(1.5, 4.0)
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        img = img / img.max() * 235 + rng.integers(1, 21, size=(28, 28))
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        out[i].flat[rng.integers(0, 28 * 28)] = 255
    return out


def make_fake_mnist_arrays(n_train: int = 64, n_test: int = 32, seed: int = 0) -> dict:
    """The arrays :func:`write_fake_mnist` writes: ``{"train"|"test": (images, labels)}``.

    ``images`` uint8 (n, 28, 28), ``labels`` uint8 (n,) cycling 0..9 from a per-split
    offset (train starts at 0, test at 3) so the splits differ.
    """
    return {
        "train": (make_fake_digits(n_train, seed), (np.arange(n_train) % 10).astype(np.uint8)),
        "test": (
            make_fake_digits(n_test, seed + 1),
            ((np.arange(n_test) + 3) % 10).astype(np.uint8),
        ),
    }


def write_idx_images(path: Path, images: np.ndarray, magic: int = IMAGE_MAGIC) -> None:
    """Write uint8 images (n, rows, cols) as an IDX3 file (magic overridable for tests)."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">iiii", magic, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray, magic: int = LABEL_MAGIC) -> None:
    """Write uint8 labels (n,) as an IDX1 file (magic overridable for tests)."""
    path.write_bytes(struct.pack(">ii", magic, len(labels)) + labels.astype(np.uint8).tobytes())


def write_fake_mnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Write valid synthetic MNIST IDX files into ``root/MNIST/raw/`` and return ``root``."""
    root = Path(root)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in make_fake_mnist_arrays(n_train, n_test, seed).items():
        img_name, lbl_name = FILE_NAMES[split]
        write_idx_images(raw / img_name, images)
        write_idx_labels(raw / lbl_name, labels)
    return root


def padded(n: int, seed: int) -> Any:
    """n fake digits as uint8 (n, 1, 32, 32), zero-padded like ``load_mnist_split``."""
    import torch

    x = torch.from_numpy(make_fake_digits(n, seed)).unsqueeze(1)
    return torch.nn.functional.pad(x, (2, 2, 2, 2))


def read_idx(path: Path) -> np.ndarray:
    """Independent IDX reader (numpy only) for uint8 IDX1/IDX3 files."""
    data = Path(path).read_bytes()
    magic = struct.unpack(">i", data[:4])[0]
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "i" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
