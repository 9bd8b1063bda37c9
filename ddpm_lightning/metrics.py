"""Sample-quality metrics for 32x32 MNIST in the feature space of an MNIST classifier: FID / IS / class coverage.

The features and class probabilities come from :class:`ddpm_lightning.classifier.MNISTClassifier` (by default the
packaged reference classifier, see :mod:`ddpm_lightning.classifier`); this module only does the maths on them.

* ``classifier_fid``: Frechet distance between Gaussians fitted to the features of two image sets (float64; the
  matrix square root via eigen-decompositions of symmetric matrices, see :func:`frechet_distance`).
* ``fid_floor``: the same distance between ``n`` real *training* images and the 10,000 test images. FID is biased
  upwards for small ``n``, so a model's FID at ``n`` samples is read against the floor at the same ``n``.
* ``inception_score``: ``exp(E_x KL(p(y|x) || p(y)))`` with the classifier's probabilities; 1 .. 10 for MNIST.
* ``class_histogram`` / ``normalised_entropy``: counts of the predicted classes, and their entropy / log(10)
  (1.0 = every digit equally often, 0.0 = one digit only: mode collapse).
* ``confident_fraction``: share of images whose top class probability is >= 0.9 (recognisable digits).

This module imports neither Hydra nor Lightning.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ddpm_lightning.classifier import FORWARD_BATCH, NUM_CLASSES, MNISTClassifier
from ddpm_lightning.errors import is_int
from ddpm_lightning.images import as_model_input, as_nchw

__all__ = [
    "classifier_outputs",
    "gaussian_stats",
    "frechet_distance",
    "classifier_fid",
    "inception_score",
    "class_histogram",
    "normalised_entropy",
    "confident_fraction",
    "evaluate_images",
]


@torch.no_grad()
def classifier_outputs(images: torch.Tensor, classifier: MNISTClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features float64 (N, D), probabilities float64 (N, 10))`` of ``images`` (any layout of
    :func:`as_model_input`), in batches of 500, the classifier in eval mode."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    feats, probs = [], []
    for i in range(0, images.shape[0], FORWARD_BATCH):
        x = as_model_input(images[i : i + FORWARD_BATCH]).to(device)
        f = classifier.features(x)
        feats.append(f.double().cpu())
        probs.append(torch.softmax(classifier.head(f).double(), dim=1).cpu())
    classifier.train(was_training)
    if not feats:
        raise ValueError("no images")
    return torch.cat(feats), torch.cat(probs)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``features (N, D)``, float64; needs N >= 2."""
    f = features.double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {tuple(f.shape)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, float64:

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``,

    with ``tr((sigma1 sigma2)^(1/2)) = tr((sqrt(sigma1) sigma2 sqrt(sigma1))^(1/2))`` = the sum of the square roots of
    the eigenvalues of a symmetric PSD matrix (``eigh``, no complex round-off as with ``eig`` of the product).
    Clamped at 0 (the distance is non-negative; identical inputs may give -1e-12).
    """
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.shape != mu2.shape or mu1.dim() != 1 or s1.shape != (mu1.numel(),) * 2 or s2.shape != s1.shape:
        raise ValueError(
            f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, mu2 {tuple(mu2.shape)}, "
            f"sigma2 {tuple(s2.shape)}"
        )
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt
    return max(float(value), 0.0)


def _fid_from_features(fa: torch.Tensor, fb: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))


def classifier_fid(images_a: torch.Tensor, images_b: torch.Tensor, classifier: MNISTClassifier) -> float:
    """FID between two image sets in the classifier's 128-d feature space (each set needs >= 2 images)."""
    fa, _ = classifier_outputs(images_a, classifier)
    fb, _ = classifier_outputs(images_b, classifier)
    return _fid_from_features(fa, fb)


def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must be (N, K) with N >= 1, got shape {tuple(p.shape)}")
    return p


def inception_score(probs: torch.Tensor, splits: int = 1) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` for ``probs (N, K)`` (rows sum to 1), the mean over ``splits`` equal
    parts (the marginal ``p(y)`` is taken per part). 1 = every image gets the same distribution; K = confident
    predictions spread evenly over the K classes."""
    p = _check_probs(probs)
    if not is_int(splits) or not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be an integer in [1, N={p.shape[0]}], got {splits!r}")
    scores = []
    for part in torch.tensor_split(p, splits):
        marginal = part.mean(0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(1)
        scores.append(math.exp(float(kl.mean())))
    return sum(scores) / len(scores)


def class_histogram(probs: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Counts ``(num_classes,)`` int64 of the predicted class (argmax) of each row of ``probs``."""
    p = _check_probs(probs)
    return torch.bincount(p.argmax(1), minlength=num_classes)[:num_classes]


def normalised_entropy(hist: torch.Tensor) -> float:
    """Entropy of the class frequencies ``hist / hist.sum()`` divided by ``log(K)``: 1.0 = uniform, 0.0 = one class."""
    h = torch.as_tensor(hist, dtype=torch.float64).flatten()
    if h.numel() < 2 or float(h.sum()) <= 0 or bool((h < 0).any()):
        raise ValueError("hist must hold >= 2 non-negative counts with a positive sum")
    q = h / h.sum()
    return float(-torch.special.xlogy(q, q).sum() / math.log(h.numel())) + 0.0  # + 0.0: one class is 0.0, not -0.0


def confident_fraction(probs: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of rows whose largest probability is ``>= threshold``."""
    p = _check_probs(probs)
    return float((p.max(1).values >= threshold).double().mean())


def evaluate_images(
    images: torch.Tensor,
    classifier: MNISTClassifier,
    real_test: torch.Tensor,
    real_train: torch.Tensor,
    meta: dict[str, Any] | None = None,
    floor_offset: int = 0,
    labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """All metrics of ``images`` (uint8 ``(N, 1, 32, 32)`` or ``(N, 32, 32, 1)``, N >= 2).

    Args:
        images: the images to judge (e.g. model samples).
        classifier: feature extractor / classifier (eval mode is set while computing).
        real_test: the real reference images (the 10,000 MNIST test images).
        real_train: real training images; the first ``n`` (from ``floor_offset``) give the real-vs-real floor.
        meta: the classifier's meta (for ``classifier_sha256`` / ``classifier_test_accuracy``).
        labels: for class-conditional samples, the requested class of each image (int ``(N,)``): adds
            ``label_accuracy``, the fraction the classifier assigns to the requested class (None otherwise).

    Returns:
        dict with ``n``, ``fid`` (vs ``real_test``), ``fid_floor`` (``floor_n`` real training images vs
        ``real_test``; ``floor_n = min(n, available)``), ``n_test``, ``inception_score``,
        ``inception_score_test`` (of the real test images, the ceiling), ``class_histogram`` (list of 10 ints),
        ``normalised_entropy``, ``confident_fraction``, ``classifier_sha256``, ``classifier_test_accuracy``,
        ``classifier_reference`` (True for the packaged reference classifier).
    """
    images = as_nchw(images)
    n = int(images.shape[0])
    if n < 2:
        raise ValueError(f"need at least 2 images for FID, got {n}")
    feats, probs = classifier_outputs(images, classifier)
    test_feats, test_probs = classifier_outputs(real_test, classifier)
    floor_imgs = as_nchw(real_train)[floor_offset : floor_offset + n]
    floor_feats, _ = classifier_outputs(floor_imgs, classifier)
    test_stats = gaussian_stats(test_feats)
    hist = class_histogram(probs)
    meta = meta or {}
    return {
        "n": n,
        "fid": frechet_distance(*gaussian_stats(feats), *test_stats),
        "fid_floor": frechet_distance(*gaussian_stats(floor_feats), *test_stats),
        "floor_n": int(floor_feats.shape[0]),
        "n_test": int(test_feats.shape[0]),
        "inception_score": inception_score(probs),
        "inception_score_test": inception_score(test_probs),
        "class_histogram": [int(v) for v in hist],
        "normalised_entropy": normalised_entropy(hist),
        "confident_fraction": confident_fraction(probs),
        "classifier_sha256": meta.get("sha256_of_weights"),
        "classifier_test_accuracy": meta.get("test_accuracy"),
        "classifier_reference": meta.get("reference"),
        "label_accuracy": None
        if labels is None
        else float((probs.argmax(1).cpu() == labels.long().cpu()).float().mean()),
    }
