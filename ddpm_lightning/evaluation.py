"""Sample quality of a DDPM on MNIST, measured with the MNIST classifier: the body of ``ddpm-evaluate`` and of
``ddpm-train``'s end-of-run evaluation.

Three sources of images: a ``samples.npz`` of ``ddpm-sample``, a checkpoint (sampled here, in memory, by
:func:`ddpm_lightning.sampling.draw_samples`; the samples are also written to ``<out_dir>/samples``), or ``real``
(real training images: the floor alone). Metrics (:mod:`ddpm_lightning.metrics`): FID in the classifier's feature
space against the 10,000 test images and its floor, the Inception Score with the classifier, the class histogram and
its normalised entropy, the confident fraction; with ``nll=true``, the variational bound in bits/dim of test images
(:mod:`ddpm_lightning.losses`). The classifier is the packaged reference unless
``classifier_path`` names another (:mod:`ddpm_lightning.classifier`). Every input is checked before any work.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_lightning.checkpoint import checkpoint_file
from ddpm_lightning.classifier import (
    load_classifier,
    missing_classifier_error,
    reference_classifier_path,
    train_classifier,
)
from ddpm_lightning.config import EvaluateConfig, check_out_dir, options
from ddpm_lightning.errors import ConfigError, check_bool, check_int, invalid, is_int
from ddpm_lightning.images import atomic_write, nhwc_to_nchw, to_model_range, to_uint8
from ddpm_lightning.losses import Bound, digit_mask
from ddpm_lightning.metrics import evaluate_images
from ddpm_lightning.mnist import MNIST_NUM_TEST, check_mnist_files, load_mnist_split
from ddpm_lightning.module import check_conditioning
from ddpm_lightning.sampling import (
    SAMPLES_FILE,
    build_sampler,
    checkpoint_ddpm,
    draw_samples,
    learn_sigma_of,
    open_checkpoint,
    resolve_device,
    write_samples,
)
from ddpm_lightning.schedule import VARIANCES, check_variance

METRICS_FILE = "metrics.json"
REAL_MODES = ("real", "real-train")
REAL_DEFAULT_N = 10000


def load_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``arr_0`` of a samples.npz as uint8 ``(N, 1, 32, 32)`` and ``arr_1`` (the requested class of each
    conditional sample, int64 ``(N,)``) or None.

    Raises:
        ConfigError: naming ``samples``: unreadable, no ``arr_0``, not uint8, another shape, fewer than 2 images.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise invalid("samples", str(path), f"holds no arr_0 (arrays: {', '.join(f.files) or 'none'})")
            arr = f["arr_0"]
            labels = torch.from_numpy(f["arr_1"].astype(np.int64)) if "arr_1" in f.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, ConfigError):
            raise
        raise invalid("samples", str(path), f"not a readable .npz file ({type(err).__name__})") from None
    if arr.dtype != np.uint8:
        raise invalid("samples", str(path), f"arr_0 must be uint8 0..255, got {arr.dtype}")
    images = torch.from_numpy(np.ascontiguousarray(arr))
    if arr.ndim == 4 and arr.shape[1:] == (32, 32, 1):
        images = nhwc_to_nchw(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 32, 32):
        raise invalid("samples", str(path), f"arr_0 must be (N, 32, 32, 1) or (N, 1, 32, 32), got {arr.shape}")
    if images.shape[0] < 2:
        raise invalid("samples", str(path), f"holds {images.shape[0]} image(s); FID needs at least 2")
    return images.contiguous(), labels


def mode(opts: EvaluateConfig) -> str:
    """``"real"``, ``"samples"`` or ``"checkpoint"``: what ``opts`` evaluates."""
    return "checkpoint" if opts.samples is None else "real" if str(opts.samples) in REAL_MODES else "samples"


def check(opts: EvaluateConfig, ckpt_must_exist: bool = True) -> Path:
    """Every check that needs neither the classifier nor the images, in the order a user fixes them.
    ``ckpt_must_exist=False``: the checkpoint will be written later (ddpm-train's end-of-run evaluation).

    Returns:
        the classifier file to use.

    Raises:
        ConfigError / MNISTDataError: one line naming the key.
    """
    if (opts.samples is None) == (opts.ckpt_path is None):
        raise ConfigError(
            "give exactly one of samples=<samples.npz> (or samples=real) and ckpt_path=<checkpoint>: "
            f"got samples={opts.samples!r}, ckpt_path={opts.ckpt_path!r}"
        )
    if mode(opts) == "samples" and not Path(opts.samples).expanduser().is_file():
        raise invalid("samples", str(opts.samples), "no such file; give a samples.npz from ddpm-sample, or real")
    if mode(opts) == "checkpoint":
        if ckpt_must_exist:
            checkpoint_file(opts.ckpt_path)
        check_int("num_samples", opts.num_samples, 2, "must be an integer >= 2 (FID needs at least 2 images)")
        check_out_dir(opts.out_dir, f"samples/{SAMPLES_FILE}", opts.overwrite)
    check_int("n", opts.n, 2, "must be null (all images) or an integer >= 2", nullable=True)
    if check_bool("nll", opts.nll):
        if mode(opts) != "checkpoint":
            raise invalid("nll", True, "the bound needs the network: give ckpt_path=<checkpoint> instead of samples=")
        if not is_int(opts.nll_n) or not 2 <= opts.nll_n <= MNIST_NUM_TEST:
            raise invalid("nll_n", opts.nll_n, f"must be an integer in [2, {MNIST_NUM_TEST}] (test images)")
        if opts.nll_variance is not None and opts.nll_variance not in VARIANCES:
            raise invalid("nll_variance", opts.nll_variance, f"must be null or one of {list(VARIANCES)}")
    check_int("classifier_epochs", opts.classifier_epochs, 1, "must be a positive integer")
    check_out_dir(opts.out_dir, METRICS_FILE, opts.overwrite)
    root = opts.data.root
    if root is None or str(root) == "":
        raise invalid("data.root", root, "must be the directory containing MNIST/raw (e.g. data.root=../shared/data)")
    check_mnist_files(str(root))
    clf = Path(opts.classifier_path).expanduser() if opts.classifier_path is not None else reference_classifier_path()
    if clf.exists() and not clf.is_file():
        raise invalid("classifier_path", str(clf), "is a folder, not a classifier file")
    if not clf.is_file() and not opts.train_classifier_if_missing:
        raise missing_classifier_error(clf, root=str(root))
    return clf


def check_before_training(
    opts: EvaluateConfig,
    num_timesteps: int,
    run_sampler: Any,
    learn_sigma: bool = False,
    num_classes: int | None = None,
) -> None:
    """Check an end-of-run evaluation before training starts (the checkpoint does not exist yet): the options, the
    guidance scale against the network's ``num_classes`` (None = unconditional), and the sampler it will build from
    the run's ``sampler`` node (which the checkpoint will store)."""
    check(opts, ckpt_must_exist=False)
    check_conditioning(num_classes, None, opts.guidance_scale)
    build_sampler(opts.sampler, run_sampler, num_timesteps, learn_sigma)
    if opts.nll and opts.nll_variance is not None:
        check_variance(opts.nll_variance, learn_sigma, key="nll_variance")


def inception_fid(images: torch.Tensor, real_test: torch.Tensor) -> dict[str, Any]:
    """The standard Inception-v3 FID (torchmetrics + torch-fidelity, 2048-d pool features) against the test images,
    from uint8 ``(N, 1, 32, 32)`` images.

    Needs ``pip install torch-fidelity`` and the Inception weights in torch's hub cache (downloaded once with
    internet); without them it is skipped with the reason, never an error. Slow on a CPU (every image is resized
    to 299x299). Returns ``{"inception_fid": float | None, "inception_fid_skipped": str | None}``.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048)
        for batch, real in [(real_test, True), (images, False)]:
            for i in range(0, batch.shape[0], 500):
                fid.update(batch[i : i + 500].expand(-1, 3, -1, -1), real=real)
        return {"inception_fid": float(fid.compute()), "inception_fid_skipped": None}
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
        return {"inception_fid": None, "inception_fid_skipped": reason}


def format_table(m: dict[str, Any]) -> str:
    """The metrics as the table ``ddpm-evaluate`` prints."""
    hist = " ".join(f"{d}:{c}" for d, c in enumerate(m["class_histogram"]))
    acc = m.get("classifier_test_accuracy")
    sha = m.get("classifier_sha256") or "?"
    which = "the reference" if m.get("classifier_reference") else "a non-reference"
    rows = [
        f"\nEvaluated {m['n']} images ({m['source']}) with {which} classifier {sha[:16]} "
        f"(test accuracy {acc * 100:.2f}%)"
        if acc is not None
        else f"\nEvaluated {m['n']} images ({m['source']})",
        *([f"  {'sampler':<34}: {m['sampler']} ({m['sampler_source']})"] if m.get("sampler") else []),
        *(
            [f"  {'classifier-free guidance scale':<34}: {m['guidance_scale']:g}"]
            if m.get("guidance_scale") is not None
            else []
        ),
        f"  {'FID vs ' + str(m['n_test']) + ' test images':<34}: {m['fid']:.4f}",
        f"  {'FID floor (' + str(m['floor_n']) + ' train vs test)':<34}: {m['fid_floor']:.4f}",
        f"  {'Inception Score':<34}: {m['inception_score']:.3f}  (real test images: {m['inception_score_test']:.3f})",
        f"  {'class histogram':<34}: {hist}",
        f"  {'normalised class entropy':<34}: {m['normalised_entropy']:.4f}  (1 = uniform)",
        f"  {'confident fraction (p >= 0.9)':<34}: {m['confident_fraction']:.4f}",
        *(
            [f"  {'classified as the requested label':<34}: {m['label_accuracy']:.4f}"]
            if m.get("label_accuracy") is not None
            else []
        ),
        f"  {'metrics':<34}: {m['metrics_json']}",
    ]
    if "inception_fid" in m:
        value = (
            f"{m['inception_fid']:.4f}" if m["inception_fid"] is not None else f"skipped ({m['inception_fid_skipped']})"
        )
        rows.insert(-1, f"  {'Inception-v3 FID (standard)':<34}: {value}")
    if "bpd" in m:
        q = " ".join(f"{v:.4f}" for v in m["quartile_bpd"])
        rows[-1:-1] = [
            f"  {'bits/dim, 784 real pixels (bound)':<34}: {m['bpd']:.4f} +- {m['bpd_stderr']:.4f}  "
            f"({m['nll_n']} test images, {m['nll_variance']} variance, {m['nll_seconds']:.0f} s)",
            f"  {'  prior L_T':<34}: {m['prior_bpd']:.2e}",
            f"  {'  sum of KL terms, t >= 1':<34}: {m['vb_bpd']:.4f}",
            f"  {'  decoder L_0':<34}: {m['decoder_bpd']:.4f}",
            f"  {'  by t quartile (low noise first)':<34}: {q}",
            f"  {'bits/dim, all 1024 pixels':<34}: {m['bpd_all_pixels']:.4f}  (padding: {m['padding_bpd']:.4f})",
        ]
    return "\n".join(rows)


def bound_metrics(
    ddpm: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    variance: str | None,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> dict[str, Any]:
    """The variational bound of uint8 ``(N, 1, 32, 32)`` images under ``ddpm``
    (:meth:`~ddpm_lightning.module.DDPM.variational_bound`), in batches of ``batch_size`` (batch i draws its eps from a
    generator seeded ``seed + i``), as the flat metrics ``bpd``, ``bpd_stderr``, ``bpd_all_pixels``, ``prior_bpd``,
    ``vb_bpd``, ``decoder_bpd``, ``padding_bpd``, ``quartile_bpd`` (see :meth:`~ddpm_lightning.losses.Bound.summary`),
    ``nll_n``, ``nll_variance``, ``nll_seconds`` and ``nll_forward_passes``."""
    parts = []
    for i, start in enumerate(range(0, images.shape[0], batch_size)):
        x0 = to_model_range(images[start : start + batch_size]).to(ddpm.device)
        y = labels[start : start + batch_size] if labels is not None and ddpm.num_classes is not None else None
        generator = torch.Generator(device=ddpm.device).manual_seed(seed + i)
        parts.append(
            ddpm.variational_bound(
                x0, labels=y, variance=variance, generator=generator, mask=digit_mask(), progress=progress
            )
        )
    bound = Bound.cat(parts)
    summary = bound.summary()
    summary["nll_n"] = summary.pop("n")
    return {
        **summary,
        "nll_variance": bound.variance,
        "nll_seconds": bound.seconds,
        "nll_forward_passes": bound.forward_passes,
    }


def _images(
    opts: EvaluateConfig, real_train: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, str, dict[str, Any]]:
    """The images to judge (uint8 ``(N, 1, 32, 32)``), their requested labels, a description, and sampler facts
    (with the checkpoint's DDPM under ``"ddpm"``)."""
    kind = mode(opts)
    if kind == "real":
        n = opts.n if opts.n is not None else min(REAL_DEFAULT_N, real_train.shape[0])
        if n > real_train.shape[0]:
            raise invalid("n", n, f"exceeds the {real_train.shape[0]} training images under data.root={opts.data.root}")
        start = real_train.shape[0] - n  # the last n training images; the floor uses the first n
        return real_train[start:], None, f"real training images {start}..{real_train.shape[0] - 1}", {}
    if kind == "samples":
        images, labels = load_samples(Path(opts.samples).expanduser().resolve())
        if opts.n is not None and opts.n > images.shape[0]:
            raise invalid("n", opts.n, f"exceeds the {images.shape[0]} images in samples={opts.samples}")
        return images, labels, str(Path(opts.samples).expanduser().resolve()), {}
    if opts.n is not None and opts.n > opts.num_samples:
        raise invalid("n", opts.n, f"exceeds num_samples={opts.num_samples}")
    device = resolve_device(opts.device)
    ckpt = Path(opts.ckpt_path).expanduser().resolve()
    opened = open_checkpoint(ckpt, opts.sampler, None, opts.guidance_scale)
    if opts.nll and opts.nll_variance is not None:
        check_variance(opts.nll_variance, learn_sigma_of(opened.ckpt["hyper_parameters"]["config"]), key="nll_variance")
    ddpm, _ = checkpoint_ddpm(opened, device, use_ema=opts.use_ema)
    drawn = draw_samples(
        ddpm,
        opts.num_samples,
        sampler=opened.sampler,
        batch_size=opts.batch_size,
        seed=opts.seed,
        guidance_scale=opts.guidance_scale,
        progress=True,
    )
    written = write_samples(opts.out_dir / "samples", drawn, overwrite=opts.overwrite)
    info = {
        "sampler": repr(opened.sampler),
        "sampler_source": opened.sampler_source,
        "samples": str(written["samples"]),
        "guidance_scale": float(opts.guidance_scale) if ddpm.num_classes is not None else None,
        "ddpm": ddpm,
    }
    return to_uint8(drawn.x0), drawn.labels, f"{opts.num_samples} samples from {ckpt} -> {written['samples']}", info


def evaluate(opts: EvaluateConfig | Any) -> dict[str, Any]:
    """Evaluate as configured (an :class:`EvaluateConfig`, or a composed ``conf/evaluate.yaml``); returns the
    metrics dict (also written to ``<out_dir>/metrics.json``) and prints the table.

    Raises:
        ConfigError / MNISTDataError: one line naming the key, before any sampling or training of a classifier.
    """
    if not isinstance(opts, EvaluateConfig):
        opts = options(opts, EvaluateConfig, "ddpm-evaluate")
    clf_path = check(opts)
    start = time.perf_counter()
    if not clf_path.is_file():
        print(
            f"classifier {clf_path} not found: training it now on data.root={opts.data.root} "
            f"({opts.classifier_epochs} epochs; train_classifier_if_missing=true) ...",
            flush=True,
        )
        trained = train_classifier(opts.data.root, clf_path, epochs=opts.classifier_epochs)
        print(f"classifier test accuracy {trained['test_accuracy'] * 100:.2f}%, saved to {clf_path}", flush=True)
    classifier, meta = load_classifier(clf_path)
    real_train, _ = load_mnist_split(opts.data.root, train=True)
    real_test, test_labels = load_mnist_split(opts.data.root, train=False)
    images, labels, source, info = _images(opts, real_train)
    ddpm = info.pop("ddpm", None)
    if opts.n is not None:
        images, labels = images[: opts.n], (labels[: opts.n] if labels is not None else None)
    metrics = evaluate_images(images, classifier, real_test, real_train, meta=meta, labels=labels)
    if opts.inception_fid:
        metrics.update(inception_fid(images, real_test))
    if opts.nll:
        if opts.nll_n > real_test.shape[0]:
            raise invalid(
                "nll_n", opts.nll_n, f"exceeds the {real_test.shape[0]} test images under data.root={opts.data.root}"
            )
        print(
            f"variational bound of {opts.nll_n} test images "
            f"({opts.nll_n * ddpm.schedule.num_timesteps} network calls) ...",
            flush=True,
        )
        metrics.update(
            bound_metrics(
                ddpm,
                real_test[: opts.nll_n],
                test_labels[: opts.nll_n],
                opts.nll_variance,
                opts.batch_size,
                opts.seed,
                progress=True,
            )
        )
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = opts.out_dir / METRICS_FILE
    kind = mode(opts)
    metrics.update(
        {
            "mode": kind,
            "source": source,
            "samples": info.pop("samples", None)
            or (str(Path(opts.samples).expanduser().resolve()) if kind == "samples" else "real"),
            "ckpt_path": str(Path(opts.ckpt_path).expanduser().resolve()) if kind == "checkpoint" else None,
            **info,
            "classifier_path": str(clf_path),
            "data_root": str(opts.data.root),
            "seconds": time.perf_counter() - start,
            "metrics_json": str(metrics_path),
        }
    )
    atomic_write(metrics_path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    print(format_table(metrics), flush=True)
    return metrics
