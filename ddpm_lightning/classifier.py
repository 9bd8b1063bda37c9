"""The reference MNIST classifier: :class:`MNISTClassifier`, its training recipe and augmentation, the weights file
format, the weights' sha256 and where the files live.

The Inception network of the usual FID is trained on ImageNet photographs and says little about 32x32 digits, so the
sample-quality metrics (:mod:`ddpm_lightning.metrics`) use the features of :class:`MNISTClassifier` (a small CNN,
>= 99% test accuracy): ``features(x)`` is its 128-dimensional penultimate layer and ``forward(x)`` its 10 logits.
Numbers computed with it are comparable only between runs that use the *same* classifier weights, so every result
records ``classifier_sha256``. The package ships one reference classifier
(``ddpm_lightning/assets/mnist_classifier.pt``, sha256 of its weights pinned in :data:`REFERENCE_CLASSIFIER_SHA256` and
checked at every load): it is the default everywhere, so that figures from different machines are measured with the same
yardstick, as Inception FID is across papers. ``ddpm-train-classifier`` runs :func:`train_classifier`, the recipe that
produced it (``seed=0`` reproduces the pinned sha256 bit for bit); its output is another feature network, selected with
``classifier_path=<file>``.

This module imports neither Hydra nor Lightning (the MNIST loader is imported lazily by :func:`train_classifier`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm_lightning.errors import ConfigError, check_int, invalid, is_number
from ddpm_lightning.images import as_model_input, atomic_write

__all__ = [
    "CLASSIFIER_VERSION",
    "FEATURE_DIM",
    "NUM_CLASSES",
    "CACHE_ENV",
    "CLASSIFIER_FILE",
    "FORWARD_BATCH",
    "MNISTClassifier",
    "REFERENCE_CLASSIFIER_SHA256",
    "reference_classifier_path",
    "trained_classifier_path",
    "weights_sha256",
    "train_classifier",
    "missing_classifier_error",
    "load_classifier",
]

PathLike = Union[str, "os.PathLike[str]"]

CLASSIFIER_VERSION = 1  #: format of the saved classifier file (bump when the architecture changes)
FEATURE_DIM = 128  #: width of MNISTClassifier.features
NUM_CLASSES = 10
CACHE_ENV = "DDPM_LIGHTNING_CACHE"
CLASSIFIER_FILE = "mnist_classifier.pt"
#: sha256 of the reference classifier's weights (:func:`weights_sha256`), trained with ``ddpm-train-classifier
#: data.root=<MNIST> seed=0`` (3 epochs, 99.37% test accuracy) and shipped in ``ddpm_lightning/assets``.
REFERENCE_CLASSIFIER_SHA256 = "86e9968c51c2767c00977eaccd883ffed17fa7cfe19d02e58fd7fc011e667db5"
FORWARD_BATCH = 500  #: images per forward pass when extracting features or measuring accuracy


class MNISTClassifier(nn.Module):
    """Small CNN on ``(N, 1, 32, 32)`` images in ``[-1, 1]``.

    Three conv blocks (16, 32, 64 channels; 32 -> 16 -> 8 -> 4 pixels), then a 128-unit fully connected layer
    (:meth:`features`, after ReLU) and a linear layer to 10 logits (:meth:`forward`). About 0.16 M parameters,
    ~2.6 M multiply-adds per image (cheap on a CPU).
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(1, 16), block(16, 32), block(32, 64))  # (N, 64, 4, 4)
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(N, 128)`` (non-negative, after ReLU)."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 10)``."""
        return self.head(self.dropout(self.features(x)))


def reference_classifier_path() -> Path:
    """The reference classifier shipped inside the package (``ddpm_lightning/assets/mnist_classifier.pt``): the
    default of ``ddpm-evaluate``, ``callbacks.fid`` and ``ddpm-train``'s end-of-run evaluation."""
    return Path(__file__).resolve().parent / "assets" / CLASSIFIER_FILE


def trained_classifier_path() -> Path:
    """Where ``ddpm-train-classifier`` writes by default: ``$DDPM_LIGHTNING_CACHE/mnist_classifier.pt``, else
    ``~/.cache/ddpm_lightning/mnist_classifier.pt`` (never over the packaged reference; not next to the data:
    ``data.root`` may be read-only). Use it with ``classifier_path=<that file>``.
    """
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "ddpm_lightning"
    return root / CLASSIFIER_FILE


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of the concatenated bytes of every ``state_dict`` tensor (parameters and BatchNorm buffers), in key
    order: identifies the weights independently of the file's pickling."""
    h = hashlib.sha256()
    for _, t in model.state_dict().items():
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine per image: rotation +-10 degrees, scale 0.9..1.1, translation +-2 pixels (background -1)."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(10)
    scale = 1 + 0.1 * u[:, 1]
    tx, ty = u[:, 2] * (2 / 16), u[:, 3] * (2 / 16)  # normalised coordinates: 16 pixels = 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], FORWARD_BATCH):
        correct += int((model(x[i : i + FORWARD_BATCH]).argmax(1) == y[i : i + FORWARD_BATCH]).sum())
    return correct / max(1, x.shape[0])


def train_classifier(
    root: PathLike,
    out_path: PathLike | None = None,
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    augment: bool = True,
    max_steps: int | None = None,
    train_size: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train :class:`MNISTClassifier` on the MNIST training images under ``root`` and evaluate it on the test images.

    Plain torch loop on in-memory tensors: Adam with a one-cycle learning rate (peak ``lr``), label smoothing 0.05,
    random small affine augmentation (``augment``), ``epochs`` passes over the (first ``train_size``) training
    images, or ``max_steps`` optimiser steps in all when given (for tests). Seeded with ``seed``.

    Saves ``{"state_dict", "meta"}`` to ``out_path`` (default :func:`trained_classifier_path`) with ``torch.save``
    (loadable with ``weights_only=True``); ``meta`` holds ``test_accuracy``, ``epochs``, ``steps``, ``seed``,
    ``sha256_of_weights``, ``created``, ``version``, ``train_images``, ``seconds``.

    Returns:
        the meta dict plus ``path`` (the file written).
    """
    from ddpm_lightning.mnist import load_mnist_split

    for key, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        check_int(key, value, low)
    for key, value in (("max_steps", max_steps), ("train_size", train_size)):
        check_int(key, value, 1, "must be null or a positive integer", nullable=True)
    if not is_number(lr) or not 0 < lr < math.inf:
        raise invalid("lr", lr, "must be a finite number > 0")
    out = Path(out_path).expanduser() if out_path is not None else trained_classifier_path()
    if out.is_dir():
        raise invalid("out", str(out), "is a folder; give a file path such as mnist_classifier.pt")
    if out.resolve() == reference_classifier_path():
        raise invalid("out", str(out), "is the packaged reference classifier; write a retrained one elsewhere")

    start = time.perf_counter()
    train_u8, train_y = load_mnist_split(root, train=True)
    test_u8, test_y = load_mnist_split(root, train=False)
    if train_size is not None:
        train_u8, train_y = train_u8[:train_size], train_y[:train_size]
    x_train, x_test = as_model_input(train_u8), as_model_input(test_u8)
    n = x_train.shape[0]

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = MNISTClassifier()
    steps_per_epoch = math.ceil(n / batch_size)
    total = max_steps if max_steps is not None else epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    step = 0
    epoch = 0
    while step < total:
        model.train()
        perm = torch.randperm(n, generator=generator)
        running, seen = 0.0, 0
        for i in range(0, n, batch_size):
            if step >= total:
                break
            idx = perm[i : i + batch_size]
            xb, yb = x_train[idx], train_y[idx]
            if augment:
                xb = _augment(xb, generator)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        epoch += 1
        if verbose:
            print(
                f"classifier epoch {epoch}: step {step}/{total}, train loss {running / max(1, seen):.4f}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    accuracy = _accuracy(model, x_test, test_y)
    model.eval()
    seconds = time.perf_counter() - start
    meta = {
        "test_accuracy": float(accuracy),
        "epochs": int(epoch),
        "steps": int(step),
        "seed": int(seed),
        "train_images": int(n),
        "test_images": int(x_test.shape[0]),
        "sha256_of_weights": weights_sha256(model),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": CLASSIFIER_VERSION,
        "seconds": float(seconds),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp))
    return {**meta, "path": out}


def missing_classifier_error(path: Path, root: str = "<dir containing MNIST/raw>") -> ConfigError:
    """The one-line error for a ``classifier_path`` that does not exist; both hints work in every command.
    ``root``: the ``data.root`` to put in the suggested ``ddpm-train-classifier`` command, when the caller knows it.
    Keyed ``classifier_path``: ``.at("callbacks.fid")`` names the config node it was set in."""
    return invalid(
        "classifier_path",
        str(path),
        f"no such file; train one there with ddpm-train-classifier data.root={root} out={path}, or leave it unset "
        "(null) for the packaged reference classifier",
    )


def load_classifier(path: PathLike | None = None) -> tuple[MNISTClassifier, dict[str, Any]]:
    """Load a classifier written by :func:`train_classifier` (``torch.load(weights_only=True)``), in eval mode.

    ``path=None`` loads the packaged reference classifier (:func:`reference_classifier_path`), whose weights must
    hash to :data:`REFERENCE_CLASSIFIER_SHA256`.

    Returns:
        ``(model, meta)``; ``meta["sha256_of_weights"]`` identifies the weights, ``meta["reference"]`` says whether
        they are the packaged reference classifier's.

    Raises:
        ConfigError: the file is missing (the message says how to train one), is not a classifier file, has another
            format version, its weights do not match the stored sha256, or the packaged reference's weights do not
            match the pinned sha256 (a corrupt install).
    """
    reference = reference_classifier_path()
    p = Path(path).expanduser() if path is not None else reference
    is_reference = p.resolve() == reference

    def bad_file(allowed: str) -> ConfigError:
        return invalid("classifier_path", str(p), allowed)

    if not p.is_file():
        if is_reference:
            raise ConfigError(f"the packaged reference classifier {p} is missing: reinstall ddpm-lightning")
        raise missing_classifier_error(p)
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise bad_file(f"not a readable classifier file ({type(err).__name__})") from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise bad_file("not a ddpm-train-classifier file (no state_dict/meta)")
    meta = dict(blob["meta"])
    if meta.get("version") != CLASSIFIER_VERSION:
        raise bad_file(
            f"classifier format version {meta.get('version')!r}, expected {CLASSIFIER_VERSION}; retrain with "
            "ddpm-train-classifier"
        )
    model = MNISTClassifier()
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError:
        raise bad_file("weights do not fit MNISTClassifier; retrain it") from None
    model.eval()
    sha = weights_sha256(model)
    if is_reference and sha != REFERENCE_CLASSIFIER_SHA256:
        raise ConfigError(
            f"the packaged reference classifier {p} has weights sha256 {sha[:16]}..., not the pinned "
            f"{REFERENCE_CLASSIFIER_SHA256[:16]}... (a corrupt install): reinstall ddpm-lightning"
        )
    if sha != meta.get("sha256_of_weights"):
        raise bad_file("weights do not match their recorded sha256 (corrupt file)")
    meta["reference"] = sha == REFERENCE_CLASSIFIER_SHA256
    return model, meta
