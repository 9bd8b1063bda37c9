"""The MNIST raw files: presence and integrity checks, and loading a split as padded ``uint8`` tensors.

The files are read from torchvision's on-disk layout, ``<root>/MNIST/raw/<file>``, holding the four uncompressed
IDX files listed in :data:`EXPECTED_FILES`. They are parsed with torchvision's own IDX readers
(``read_image_file`` / ``read_label_file``), which check the magic number (data type ``uint8`` and the number of
dimensions) and, through the final reshape, that the file size matches its header. This module turns their
exceptions into one-line :class:`MNISTDataError` messages that name the file, its actual size and what was
expected, with the Hydra keys to change (``data.root``, ``data.download=true``), and adds what torchvision does not
check: every missing file is listed, images are 28x28, a split has as many labels as images, labels are ``0..9``.

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
from torchvision.datasets.mnist import read_image_file, read_label_file

from ddpm_lightning.errors import MNISTDataError, first_line

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

#: What torchvision's readers raise on a bad file: an assert on the magic number, a failing reshape when the size
#: does not match the header, a dtype / ndim check, an unknown data type code, a buffer shorter than the header.
_READER_ERRORS = (AssertionError, RuntimeError, TypeError, ValueError, KeyError, IndexError, OSError)


def raw_dir(root: PathLike) -> Path:
    """``<root>/MNIST/raw`` (``~`` expanded), torchvision's folder for the four IDX files."""
    return Path(root).expanduser() / "MNIST" / "raw"


def _require_files(root: PathLike) -> Path:
    """The raw folder, after checking that all four files exist (the message lists every missing path)."""
    raw = raw_dir(root)
    missing = [raw / name for name in EXPECTED_FILES if not (raw / name).is_file()]
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise MNISTDataError(
            f"MNIST raw file(s) not found: {names} (searched {raw.resolve()}, "
            f"from data.root={os.fspath(root)}); {_ROOT_HINT}"
        )
    return raw


def _reader_error(path: Path, is_images: bool, err: Exception) -> MNISTDataError:
    """One-line explanation of why torchvision could not read ``path``.

    Only runs after a failure: reads the file's header (16 bytes for images, 8 for labels) to say what was
    expected, the size the header implies or the magic number, next to the actual size.
    """
    redo = f"delete it and re-download (data.download=true) or {_ROOT_HINT}"
    if isinstance(err, OSError):
        return MNISTDataError(f"MNIST file {path} cannot be read ({first_line(err)}); {_ROOT_HINT}")
    header_bytes = 16 if is_images else 8
    expected_magic = IMAGE_MAGIC if is_images else LABEL_MAGIC
    full = EXPECTED_FILES[path.name]
    actual = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(header_bytes)
    if len(header) < header_bytes:
        return MNISTDataError(
            f"MNIST file {path} is truncated or corrupt: actual size {actual} bytes, smaller than the "
            f"{header_bytes}-byte IDX header (the full MNIST file is {full} bytes); {redo}"
        )
    fields = struct.unpack(">" + "I" * (header_bytes // 4), header)  # unsigned, as torchvision reads them
    magic, count = fields[0], fields[1]
    if magic != expected_magic:
        return MNISTDataError(
            f"MNIST file {path} is corrupt: bad IDX magic number {magic} (expected {expected_magic}); "
            f"actual size {actual} bytes (the full MNIST file is {full} bytes); {redo}"
        )
    implied = header_bytes + count * (fields[2] * fields[3] if is_images else 1)
    if actual != implied:
        return MNISTDataError(
            f"MNIST file {path} is truncated or corrupt: actual size {actual} bytes, expected {implied} bytes "
            f"from its IDX header ({count} items) (the full MNIST file is {full} bytes); {redo}"
        )
    return MNISTDataError(  # e.g. a header announcing 0 items: torchvision refuses the empty buffer
        f"MNIST file {path} is corrupt: torchvision cannot read it ({first_line(err)}); actual size {actual} "
        f"bytes (the full MNIST file is {full} bytes); {redo}"
    )


def _read_split(raw: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse one split's two files once: ``uint8 (N, 28, 28)`` digits and ``int64 (N,)`` labels in ``0..9``."""
    img_name, lbl_name = _SPLIT_FILES[split]
    img_path, lbl_path = raw / img_name, raw / lbl_name
    try:
        digits = read_image_file(str(img_path))
    except _READER_ERRORS as err:
        raise _reader_error(img_path, True, err) from None
    if tuple(digits.shape[1:]) != (MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE):
        raise MNISTDataError(
            f"MNIST file {img_path} is corrupt: header says images are {digits.shape[1]}x{digits.shape[2]}, "
            f"expected {MNIST_IMAGE_SIZE}x{MNIST_IMAGE_SIZE}; actual size {img_path.stat().st_size} bytes"
        )
    try:
        labels = read_label_file(str(lbl_path))  # int64
    except _READER_ERRORS as err:
        raise _reader_error(lbl_path, False, err) from None
    if digits.shape[0] != labels.shape[0]:
        raise MNISTDataError(
            f"MNIST {split} split in {raw} is inconsistent: {img_name} holds {digits.shape[0]} "
            f"images but {lbl_name} holds {labels.shape[0]} labels; {_ROOT_HINT}"
        )
    if labels.numel() and int(labels.max()) > 9:  # read from uint8, so never below 0
        raise MNISTDataError(
            f"MNIST file {lbl_path} is corrupt: labels range {int(labels.min())}..{int(labels.max())}, expected 0..9"
        )
    return digits, labels


def check_mnist_files(root: PathLike) -> Path:
    """Check that ``<root>/MNIST/raw`` holds the four MNIST IDX files, intact, before work starts.

    Parses both splits with torchvision's readers (about 55 MB for genuine MNIST) and drops the result. Files with
    fewer images than genuine MNIST are accepted as long as they are self-consistent.

    Args:
        root: directory containing ``MNIST/raw`` (torchvision's layout), e.g. ``../shared/data``.

    Returns:
        The raw directory ``<root>/MNIST/raw``.

    Raises:
        MNISTDataError: a file is missing (the message names every missing path, the directory searched, and the
            ``data.root`` / ``data.download`` hints); a file has a bad magic number, images that are not 28x28, or
            a size inconsistent with its header (the message names the file, its actual size and the size the
            header implies); a split's image and label counts differ; or a label is outside ``0..9``.
    """
    raw = _require_files(root)
    for split in _SPLIT_FILES:
        _read_split(raw, split)
    return raw


def load_mnist_split(root: PathLike, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole MNIST split into memory, zero-padded to 32x32 (each of its two files is parsed once).

    Args:
        root: directory containing ``MNIST/raw``.
        train: ``True`` for the 60,000 training images, ``False`` for the 10,000 test images (counts are those
            of genuine MNIST; smaller self-consistent files are accepted).

    Returns:
        ``(images, labels)``: ``images`` is ``uint8`` of shape ``(N, 1, 32, 32)``, values ``0..255``, the 28x28
        digits with 2 black (0) pixels added on each side; ``labels`` is ``int64`` of shape ``(N,)``, values
        ``0..9``.

    Raises:
        MNISTDataError: as :func:`check_mnist_files` (all four files must exist; only this split's are parsed).
    """
    raw = _require_files(root)
    digits, labels = _read_split(raw, "train" if train else "t10k")
    images = F.pad(digits.unsqueeze(1), (PAD, PAD, PAD, PAD), mode="constant", value=0)
    return images.contiguous(), labels


def download_mnist(root: PathLike) -> Path:
    """Download the four MNIST files with torchvision into ``<root>/MNIST/raw`` (needs internet), then check them.

    Files already present are not downloaded again.

    Returns:
        The raw directory, as :func:`check_mnist_files`.

    Raises:
        MNISTDataError: the files on disk are corrupt (also when torchvision itself fails on them).
        RuntimeError: torchvision could not download a file.
    """
    try:  # downloads all four files whatever the split, then parses the training split
        torchvision.datasets.MNIST(os.fspath(root), train=True, download=True)
    except Exception:
        if all((raw_dir(root) / name).is_file() for name in EXPECTED_FILES):
            check_mnist_files(root)  # files already there but corrupt: our one-line message
        raise
    return check_mnist_files(root)
