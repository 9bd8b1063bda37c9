"""MNIST data for the DDPM: raw-file checks, loading, scaling and a LightningDataModule.

The model works on 32x32 single-channel images in ``[-1, 1]``: the 28x28 MNIST digits
are zero-padded by 2 pixels on every side (the background stays black, i.e. ``-1``
after scaling), then mapped from ``0..255`` to ``[-1, 1]`` with ``x / 255 * 2 - 1``.

The dataset is read from torchvision's on-disk layout, ``<root>/MNIST/raw/<file>``,
holding the four uncompressed IDX files listed in :data:`EXPECTED_FILES`. Nothing is
downloaded unless ``download=True`` (Hydra: ``data.download=true``). Missing,
truncated or corrupt files raise :class:`MNISTDataError` with a one-line message that
names the file and says which Hydra key to change (``data.root``), before any
training starts.

Images are kept in memory as ``uint8`` tensors (60,000 x 1 x 32 x 32 bytes, about
61 MB for the full training set) and converted to ``float32`` one item at a time.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional, Union

import lightning
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ddpm_lightning.errors import ConfigError, invalid, is_int

__all__ = [
    "EXPECTED_FILES",
    "IMAGE_MAGIC",
    "LABEL_MAGIC",
    "MNIST_IMAGE_SIZE",
    "PADDED_IMAGE_SIZE",
    "PAD",
    "MNISTDataError",
    "check_mnist_files",
    "load_mnist_split",
    "to_model_range",
    "to_uint8",
    "PaddedMNISTDataset",
    "MNISTDataModule",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Raw IDX file name -> size in bytes of the genuine (full) MNIST file.
EXPECTED_FILES: dict[str, int] = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,  # 47,040,016
    "train-labels-idx1-ubyte": 8 + 60000,  # 60,008
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,  # 7,840,016
    "t10k-labels-idx1-ubyte": 8 + 10000,  # 10,008
}

#: IDX magic numbers (big-endian int32): 0x00000803 = uint8 data, 3 dims;
#: 0x00000801 = uint8 data, 1 dim.
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


# ----------------------------------------------------------------------------- files


def _raw_dir(root: PathLike) -> Path:
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
    raw = _raw_dir(root)
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


def to_model_range(uint8_batch: torch.Tensor) -> torch.Tensor:
    """Map ``uint8`` pixels ``0..255`` to ``float32`` in ``[-1, 1]`` as ``x / 255 * 2 - 1``.

    Works on any shape (a single ``(1, 32, 32)`` image or a ``(B, 1, 32, 32)`` batch);
    0 maps to exactly ``-1.0`` and 255 to exactly ``1.0``.

    Raises:
        TypeError: if the input is not ``torch.uint8``.
    """
    if uint8_batch.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a torch.uint8 tensor, got {uint8_batch.dtype}")
    return uint8_batch.to(torch.float32) / 255 * 2 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_range`: ``[-1, 1]`` floats to ``uint8`` ``0..255``.

    Values outside ``[-1, 1]`` (e.g. raw sampler output) are clamped first, then
    ``(x + 1) / 2 * 255`` is rounded to the nearest integer. Same shape as the input.
    ``to_uint8(to_model_range(u)) == u`` for every ``uint8`` tensor ``u``.
    """
    x = x.detach().to(torch.float32).clamp(-1.0, 1.0)
    return ((x + 1) / 2 * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- dataset


class PaddedMNISTDataset(Dataset):
    """In-memory dataset over padded ``uint8`` images.

    Args:
        images: ``uint8`` tensor ``(N, 1, 32, 32)``.
        labels: ``int64`` tensor ``(N,)``.

    Item ``i`` is ``(image, label)``: ``image`` is ``float32`` ``(1, 32, 32)`` in
    ``[-1, 1]`` (via :func:`to_model_range`), ``label`` a 0-dim ``int64`` tensor, so a
    default-collated batch is ``(B, 1, 32, 32)`` float32 and ``(B,)`` int64.

    ``__getitems__`` (used by ``DataLoader`` with automatic batching) gathers and converts a whole batch in one
    operation instead of B item calls; it returns the usual list of ``(image, label)`` pairs (views of the batch),
    so the default collate still applies. ``benchmarks/data_pipeline.py`` compares this path with torchvision's
    per-item PIL path.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 of shape (N, 1, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_range(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[self[i] for i in indices]``, converted in one gather (identical values, B times fewer calls)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = to_model_range(self.images.index_select(0, index))
        return list(zip(images.unbind(0), self.labels.index_select(0, index).unbind(0)))


class EpochShuffleSampler(RandomSampler):
    """A random permutation of ``range(n)`` that is a pure function of ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every training epoch, so a run resumed from a checkpoint visits
    the images in the same order as an uninterrupted run (a generator carried across epochs would restart).
    It is a ``RandomSampler`` so that under DDP Lightning replaces it with ``DistributedSampler(shuffle=True,
    seed=PL_GLOBAL_SEED)``, which is also a function of (seed, epoch) and gives each rank its own shard.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(range(n))
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


# ----------------------------------------------------------------------------- datamodule


def _invalid(key: str, value: object, why: str) -> ConfigError:
    return invalid(f"data.{key}", value, why)


class MNISTDataModule(lightning.LightningDataModule):
    """MNIST 32x32 in ``[-1, 1]`` for training a DDPM.

    Training data is the first ``subset_size`` of the 60,000 training images (all when
    ``None``), shuffled each epoch by :class:`EpochShuffleSampler` (a function of ``seed`` and the epoch).
    Validation data is the first ``val_size`` of the 10,000 test images, in order
    (deterministic). Batches are ``(images, labels)``: ``float32`` ``(B, 1, 32, 32)`` in
    ``[-1, 1]`` and ``int64`` ``(B,)``; the last batch may be smaller (no ``drop_last``).

    Args:
        root: directory containing ``MNIST/raw`` (Hydra ``data.root``).
        batch_size: images per batch, positive.
        subset_size: number of training images to use, or ``None`` for all.
        val_size: number of test images used for validation, ``1..10000``.
        num_workers: DataLoader worker processes, ``>= 0``; workers are persistent when
            positive.
        download: download MNIST with torchvision in :meth:`prepare_data` (needs
            internet); otherwise only check the files.
        pin_memory: passed to the DataLoaders.
        class_conditional: recorded for the model/config; the loaders always yield
            labels, an unconditional model just ignores them.
        seed: seed of the training shuffle.

    Raises:
        ValueError: on an invalid argument, one line naming the Hydra key and value, e.g.
            ``data.batch_size=0 is invalid: must be a positive integer``; also from
            :meth:`setup` when ``subset_size`` or ``val_size`` exceeds the images on disk.
        MNISTDataError: from :meth:`prepare_data` / :meth:`setup` when files are missing
            or corrupt (see :func:`check_mnist_files`).
    """

    def __init__(
        self,
        root: PathLike = "data",
        batch_size: int = 64,
        subset_size: Optional[int] = None,
        val_size: int = 1000,
        num_workers: int = 0,
        download: bool = False,
        pin_memory: bool = False,
        class_conditional: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not is_int(batch_size) or batch_size <= 0:
            raise _invalid("batch_size", batch_size, "must be a positive integer")
        if subset_size is not None and (not is_int(subset_size) or subset_size <= 0):
            raise _invalid(
                "subset_size", subset_size, "must be a positive integer, or null for all images"
            )
        if not is_int(val_size) or val_size <= 0:
            raise _invalid("val_size", val_size, "must be a positive integer")
        if val_size > MNIST_NUM_TEST:
            raise _invalid(
                "val_size", val_size, f"must be at most {MNIST_NUM_TEST} (the MNIST test set size)"
            )
        if not is_int(num_workers) or num_workers < 0:
            raise _invalid("num_workers", num_workers, "must be a non-negative integer")
        if not is_int(seed):
            raise _invalid("seed", seed, "must be an integer")
        for key, flag in (
            ("download", download),
            ("pin_memory", pin_memory),
            ("class_conditional", class_conditional),
        ):
            if not isinstance(flag, bool):
                raise _invalid(key, flag, "must be true or false")
        if root is None or os.fspath(root) == "":
            raise _invalid("root", root, "must be a directory containing MNIST/raw")

        self.root = Path(os.fspath(root)).expanduser()
        self.batch_size = batch_size
        self.subset_size = subset_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.download = download
        self.pin_memory = pin_memory
        self.class_conditional = class_conditional
        self.seed = seed
        self.save_hyperparameters()

        #: uint8 (N, 1, 32, 32) / int64 (N,) tensors, set by :meth:`setup`.
        self.train_images: Optional[torch.Tensor] = None
        self.train_labels: Optional[torch.Tensor] = None
        self.val_images: Optional[torch.Tensor] = None
        self.val_labels: Optional[torch.Tensor] = None

    # -- Lightning hooks -------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download (``download=True``) or just check the raw files, before training.

        Raises:
            MNISTDataError: files missing or corrupt (after the download, if any).
        """
        if self.download:
            for train in (True, False):
                torchvision.datasets.MNIST(os.fspath(self.root), train=train, download=True)
        check_mnist_files(self.root)

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the training subset and the validation subset into memory (once).

        Idempotent: later calls (any ``stage``) reuse the tensors already loaded.

        Raises:
            MNISTDataError: files missing or corrupt.
            ValueError: ``subset_size`` larger than the training images on disk, or
                ``val_size`` larger than the test images on disk.
        """
        if self.train_images is not None:
            return
        train_images, train_labels = load_mnist_split(self.root, train=True)
        n_avail = train_images.shape[0]
        if self.subset_size is not None:
            if self.subset_size > n_avail:
                raise _invalid(
                    "subset_size",
                    self.subset_size,
                    f"only {n_avail} training images are available in {_raw_dir(self.root)}",
                )
            # clone so the rest of the split can be freed
            train_images = train_images[: self.subset_size].clone()
            train_labels = train_labels[: self.subset_size].clone()

        test_images, test_labels = load_mnist_split(self.root, train=False)
        n_test = test_images.shape[0]
        if self.val_size > n_test:
            raise _invalid(
                "val_size",
                self.val_size,
                f"only {n_test} test images are available in {_raw_dir(self.root)}",
            )
        self.val_images = test_images[: self.val_size].clone()
        self.val_labels = test_labels[: self.val_size].clone()
        self.train_images, self.train_labels = train_images, train_labels

    # -- data ------------------------------------------------------------------------

    def _require_setup(self) -> None:
        if self.train_images is None:
            raise RuntimeError("MNISTDataModule.setup() must be called before using the data")

    @property
    def num_train(self) -> int:
        """Number of training images in use (after :meth:`setup`)."""
        self._require_setup()
        return int(self.train_images.shape[0])

    @property
    def num_val(self) -> int:
        """Number of validation images (after :meth:`setup`)."""
        self._require_setup()
        return int(self.val_images.shape[0])

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the training subset; same ``seed`` gives the same order.

        Yields ``(float32 (B, 1, 32, 32) in [-1, 1], int64 (B,))``.
        """
        self._require_setup()
        return self._loader(PaddedMNISTDataset(self.train_images, self.train_labels), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over the first ``val_size`` test images, in order, same batch size."""
        self._require_setup()
        return self._loader(PaddedMNISTDataset(self.val_images, self.val_labels), shuffle=False)
