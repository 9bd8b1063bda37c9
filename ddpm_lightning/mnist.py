"""The MNIST raw files: presence and integrity checks, and loading a split as padded ``uint8`` tensors.

The files are read from torchvision's on-disk layout, ``<root>/MNIST/raw/<file>``, holding the four uncompressed
IDX files listed in :data:`EXPECTED_FILES`. Missing, truncated or corrupt files raise :class:`MNISTDataError` with
a one-line message that names the file and says which Hydra key to change (``data.root``).

Nothing is downloaded unless :func:`download_mnist` is called. No Lightning here: torch and torchvision only.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
import torchvision

__all__ = [
    "EXPECTED_FILES",
    "IMAGE_MAGIC",
    "LABEL_MAGIC",
    "MNIST_IMAGE_SIZE",
    "MNIST_NUM_TEST",
    "PADDED_IMAGE_SIZE",
    "PAD",
    "MNISTDataError",
    "raw_dir",
    "check_mnist_files",
    "load_mnist_split",
    "download_mnist",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Raw IDX file name -> size in bytes of the genuine (full) MNIST file.
EXPECTED_FILES: dict[str, int] = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,  # 47,040,016
    "train-labels-idx1-ubyte": 8 + 60000,  # 60,008
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,  # 7,840,016
    "t10k-labels-idx1-ubyte": 8 + 10000,  # 10,008
}

#: IDX magic numbers (big-endian int32): 0x00000803 = uint8 data, 3 dims; 0x00000801 = uint8 data, 1 dim.
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049

MNIST_IMAGE_SIZE = 28  #: side of a raw MNIST digit, pixels
PAD = 2  #: zero padding added on each side, pixels
PADDED_IMAGE_SIZE = MNIST_IMAGE_SIZE + 2 * PAD  #: 32

#: Number of test images in genuine MNIST (upper bound for ``data.val_size``).
MNIST_NUM_TEST = 10000

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_ROOT_HINT = (
    "set data.root=<dir containing MNIST/raw> (e.g. data.root=../shared/data); "
    "to download instead set data.download=true (needs internet)"
)


class MNISTDataError(RuntimeError):
    """The MNIST raw files are missing, truncated or corrupt (message is one line)."""


def raw_dir(root: PathLike) -> Path:
    """``<root>/MNIST/raw`` (``~`` expanded), torchvision's folder for the four IDX files."""
    return Path(root).expanduser() / "MNIST" / "raw"


def _read_idx_header(path: Path, is_images: bool) -> tuple[int, int]:
    """Validate one IDX file's header against its size.

    Returns ``(count, actual_size_bytes)``. Raises :class:`MNISTDataError` if the magic
    number or image dimensions are wrong, or if the file size differs from what the
    header implies.
    """
    header_bytes = 16 if is_images else 8
    expected_magic = IMAGE_MAGIC if is_images else LABEL_MAGIC
    item_bytes = MNIST_IMAGE_SIZE * MNIST_IMAGE_SIZE if is_images else 1
    actual = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(header_bytes)
    if len(header) < header_bytes:
        raise MNISTDataError(
            f"MNIST file {path} is truncated or corrupt: actual size {actual} bytes, "
            f"smaller than the {header_bytes}-byte IDX header "
            f"(the full MNIST file is {EXPECTED_FILES[path.name]} bytes); "
            f"delete it and re-download (data.download=true) or {_ROOT_HINT}"
        )
    fields = struct.unpack(">" + "i" * (header_bytes // 4), header)
    magic, count = fields[0], fields[1]
    if magic != expected_magic:
        raise MNISTDataError(
            f"MNIST file {path} is corrupt: bad IDX magic number {magic} "
            f"(expected {expected_magic}); actual size {actual} bytes "
            f"(the full MNIST file is {EXPECTED_FILES[path.name]} bytes); "
            f"delete it and re-download (data.download=true) or {_ROOT_HINT}"
        )
    if is_images and (fields[2], fields[3]) != (MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE):
        raise MNISTDataError(
            f"MNIST file {path} is corrupt: header says images are {fields[2]}x{fields[3]}, "
            f"expected {MNIST_IMAGE_SIZE}x{MNIST_IMAGE_SIZE}; actual size {actual} bytes"
        )
    if count < 0:
        raise MNISTDataError(
            f"MNIST file {path} is corrupt: header gives a negative item count {count}; "
            f"actual size {actual} bytes"
        )
    implied = header_bytes + count * item_bytes
    if actual != implied:
        raise MNISTDataError(
            f"MNIST file {path} is truncated or corrupt: actual size {actual} bytes, "
            f"expected {implied} bytes from its IDX header ({count} items) "
            f"(the full MNIST file is {EXPECTED_FILES[path.name]} bytes); "
            f"delete it and re-download (data.download=true) or {_ROOT_HINT}"
        )
    return count, actual


def check_mnist_files(root: PathLike) -> Path:
    """Check that ``<root>/MNIST/raw`` holds the four MNIST IDX files, intact.

    Reads only the IDX headers (16 bytes for images, 8 for labels), so it is cheap.
    Each file's size must equal ``header + count * item_bytes`` (784 bytes per image,
    1 per label); files with fewer images than genuine MNIST are accepted as long as
    they are self-consistent, and each split's image count must equal its label count.

    Args:
        root: directory containing ``MNIST/raw`` (torchvision's layout), e.g.
            ``../shared/data``.

    Returns:
        The raw directory ``<root>/MNIST/raw``.

    Raises:
        MNISTDataError: a file is missing (message names every missing path, the
            directory searched, and the ``data.root`` / ``data.download`` hints); a file
            has a bad magic number, wrong image dimensions, or a size inconsistent with
            its header (message names the file, its actual size and the size the header
            implies); or a split's image and label counts differ.
    """
    raw = raw_dir(root)
    missing = [raw / name for name in EXPECTED_FILES if not (raw / name).is_file()]
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise MNISTDataError(
            f"MNIST raw file(s) not found: {names} (searched {raw.resolve()}, "
            f"from data.root={os.fspath(root)}); {_ROOT_HINT}"
        )
    for split, (img_name, lbl_name) in _SPLIT_FILES.items():
        n_img, _ = _read_idx_header(raw / img_name, is_images=True)
        n_lbl, _ = _read_idx_header(raw / lbl_name, is_images=False)
        if n_img != n_lbl:
            raise MNISTDataError(
                f"MNIST {split} split in {raw} is inconsistent: {img_name} holds {n_img} "
                f"images but {lbl_name} holds {n_lbl} labels; {_ROOT_HINT}"
            )
    return raw


# ----------------------------------------------------------------------------- loading


def load_mnist_split(root: PathLike, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole MNIST split into memory, zero-padded to 32x32.

    Args:
        root: directory containing ``MNIST/raw``.
        train: ``True`` for the 60,000 training images, ``False`` for the 10,000 test
            images (counts are those of genuine MNIST; smaller files are accepted).

    Returns:
        ``(images, labels)``: ``images`` is ``uint8`` of shape ``(N, 1, 32, 32)``, values
        ``0..255``, the 28x28 digits with 2 black (0) pixels added on each side;
        ``labels`` is ``int64`` of shape ``(N,)``, values ``0..9``.

    Raises:
        MNISTDataError: as :func:`check_mnist_files`, or if a label is outside ``0..9``.
    """
    raw = check_mnist_files(root)
    ds = torchvision.datasets.MNIST(os.fspath(root), train=train, download=False)
    digits = ds.data  # (N, 28, 28) uint8
    labels = ds.targets.to(torch.int64)
    images = F.pad(digits.unsqueeze(1), (PAD, PAD, PAD, PAD), mode="constant", value=0)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        name = _SPLIT_FILES["train" if train else "t10k"][1]
        raise MNISTDataError(
            f"MNIST file {raw / name} is corrupt: labels range "
            f"{int(labels.min())}..{int(labels.max())}, expected 0..9"
        )
    return images.contiguous(), labels


def download_mnist(root: PathLike) -> Path:
    """Download the MNIST files with torchvision into ``<root>/MNIST/raw`` (needs internet), then check them.

    Files already present are not downloaded again.

    Returns:
        The raw directory, as :func:`check_mnist_files`.
    """
    for train in (True, False):
        torchvision.datasets.MNIST(os.fspath(root), train=train, download=True)
    return check_mnist_files(root)
