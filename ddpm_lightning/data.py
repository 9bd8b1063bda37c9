"""MNIST data for the DDPM: the in-memory dataset, the epoch-shuffle sampler and the LightningDataModule.

The model works on 32x32 single-channel images in ``[-1, 1]``: the 28x28 MNIST digits are zero-padded by 2 pixels
on every side (the background stays black, i.e. ``-1`` after scaling), then mapped from ``0..255`` to ``[-1, 1]``
with ``x / 255 * 2 - 1`` (:func:`ddpm_lightning.images.to_model_range`).

The raw files, their checks and the loading of a split are :mod:`ddpm_lightning.mnist`'s: nothing is downloaded
unless ``download=True`` (Hydra: ``data.download=true``), and missing, truncated or corrupt files raise
:class:`~ddpm_lightning.mnist.MNISTDataError` with a one-line message that names the file and says which Hydra key
to change (``data.root``), before any training starts.

Images are kept in memory as ``uint8`` tensors (60,000 x 1 x 32 x 32 bytes, about 61 MB for the full training
set) and converted to ``float32`` one batch at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import lightning
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ddpm_lightning.errors import check_bool, check_int, invalid, is_int
from ddpm_lightning.images import to_model_range
from ddpm_lightning.mnist import MNIST_NUM_TEST, check_mnist_files, download_mnist, load_mnist_split, raw_dir

__all__ = ["PaddedMNISTDataset", "EpochShuffleSampler", "MNISTDataModule"]

PathLike = Union[str, "os.PathLike[str]"]


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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batched: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 of shape (N, 1, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.batched = batched

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_range(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, ...]:
        """``[self[i] for i in indices]``, converted in one gather (identical values, B times fewer calls); with
        ``batched`` (the images on the training device, :class:`MNISTDataModule` ``on_device``) the batch itself,
        ``(images, labels)``, gathered where the images are (the indices go there by a non-blocking copy from pinned
        memory on a GPU), for :func:`batch_as_is` to pass through."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.images.device.type == "cuda":
            index = index.pin_memory().to(self.images.device, non_blocking=True)
        images = to_model_range(self.images.index_select(0, index))
        labels = self.labels.index_select(0, index)
        if self.batched:
            return images, labels
        return list(zip(images.unbind(0), labels.unbind(0), strict=True))


def batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``collate_fn`` of a ``batched`` :class:`PaddedMNISTDataset`: its batch is already collated."""
    return batch


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
        pin_memory: passed to the DataLoaders (each batch is copied into pinned memory, for a non-blocking copy to
            the GPU).
        seed: seed of the training shuffle.
        on_device: keep the images (uint8, 61 MB for the 60,000 training images) on the training device and
            gather and convert each batch there, instead of on the host: no host-to-device copy of images per step.
            The batches are the same, in the same ``(seed, epoch)`` order. Needs ``num_workers=0`` and
            ``pin_memory=false``.

    Raises:
        ConfigError: (a ``ValueError``) on an invalid argument, one line naming the parameter and value, e.g.
            ``batch_size=0 is invalid: must be a positive integer`` (the config boundary puts it under
            ``data.``); also from :meth:`setup` when ``subset_size`` or ``val_size`` exceeds the images on disk.
        MNISTDataError: from :meth:`prepare_data` / :meth:`setup` when files are missing
            or corrupt (see :func:`ddpm_lightning.mnist.check_mnist_files`).
    """

    def __init__(
        self,
        root: PathLike = "data",
        batch_size: int = 64,
        subset_size: int | None = None,
        val_size: int = 1000,
        num_workers: int = 0,
        download: bool = False,
        pin_memory: bool = False,
        seed: int = 0,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1, "must be a positive integer")
        check_int("subset_size", subset_size, 1, "must be a positive integer, or null for all images", nullable=True)
        check_int("val_size", val_size, 1, "must be a positive integer")
        if val_size > MNIST_NUM_TEST:
            raise invalid("val_size", val_size, f"must be at most {MNIST_NUM_TEST} (the MNIST test set size)")
        check_int("num_workers", num_workers, 0, "must be a non-negative integer")
        if not is_int(seed):
            raise invalid("seed", seed, "must be an integer")
        for key, flag in (("download", download), ("pin_memory", pin_memory), ("on_device", on_device)):
            check_bool(key, flag)
        if on_device and (num_workers or pin_memory):
            raise invalid(
                "on_device",
                on_device,
                "needs num_workers=0 and pin_memory=false (the batches are gathered on "
                "the training device, in the training process)",
            )
        if root is None or os.fspath(root) == "":
            raise invalid("root", root, "must be a directory containing MNIST/raw")

        self.root = Path(os.fspath(root)).expanduser()
        self.batch_size = batch_size
        self.subset_size = subset_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.download = download
        self.pin_memory = pin_memory
        self.seed = seed
        self.on_device = on_device
        self._device_copies: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.save_hyperparameters()

        #: uint8 (N, 1, 32, 32) / int64 (N,) tensors, set by :meth:`setup`.
        self.train_images: torch.Tensor | None = None
        self.train_labels: torch.Tensor | None = None
        self.val_images: torch.Tensor | None = None
        self.val_labels: torch.Tensor | None = None

    # -- Lightning hooks -------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download (``download=True``) or just check the raw files, before training.

        Raises:
            MNISTDataError: files missing or corrupt (after the download, if any).
        """
        if self.download:
            download_mnist(self.root)  # checks the files too
        else:
            check_mnist_files(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Load the training subset and the validation subset into memory (once).

        Idempotent: later calls (any ``stage``) reuse the tensors already loaded.

        Raises:
            MNISTDataError: files missing or corrupt.
            ConfigError: ``subset_size`` larger than the training images on disk, or
                ``val_size`` larger than the test images on disk.
        """
        if self.train_images is not None:
            return
        train_images, train_labels = load_mnist_split(self.root, train=True)
        n_avail = train_images.shape[0]
        if self.subset_size is not None:
            if self.subset_size > n_avail:
                raise invalid(
                    "subset_size",
                    self.subset_size,
                    f"only {n_avail} training images are available in {raw_dir(self.root)}",
                )
            # clone so the rest of the split can be freed
            train_images = train_images[: self.subset_size].clone()
            train_labels = train_labels[: self.subset_size].clone()

        test_images, test_labels = load_mnist_split(self.root, train=False)
        n_test = test_images.shape[0]
        if self.val_size > n_test:
            raise invalid(
                "val_size",
                self.val_size,
                f"only {n_test} test images are available in {raw_dir(self.root)}",
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

    def training_device(self) -> torch.device:
        """The device of the training step (the trainer's root device; the CPU without a trainer)."""
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _dataset(self, split: str, images: torch.Tensor, labels: torch.Tensor) -> PaddedMNISTDataset:
        if not self.on_device:
            return PaddedMNISTDataset(images, labels)
        device = self.training_device()
        if (split, device) not in self._device_copies:  # once per split and device
            self._device_copies[(split, device)] = (images.to(device), labels.to(device))
        return PaddedMNISTDataset(*self._device_copies[(split, device)], batched=True)

    def _loader(self, dataset: PaddedMNISTDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=batch_as_is if dataset.batched else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the training subset; same ``seed`` gives the same order.

        Yields ``(float32 (B, 1, 32, 32) in [-1, 1], int64 (B,))`` (on the training device with ``on_device``).
        """
        self._require_setup()
        return self._loader(self._dataset("train", self.train_images, self.train_labels), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over the first ``val_size`` test images, in order, same batch size."""
        self._require_setup()
        return self._loader(self._dataset("val", self.val_images, self.val_labels), shuffle=False)
