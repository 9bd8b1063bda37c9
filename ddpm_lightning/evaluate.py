"""``ddpm-evaluate``: sample quality of a DDPM on MNIST, measured with a small MNIST classifier.

Usage::

    ddpm-evaluate samples=outputs/samples/<day>/<time>/samples.npz data.root=../shared/data
    ddpm-evaluate ckpt_path=<run>/checkpoints/last.ckpt num_samples=1000 data.root=../shared/data   # its own sampler
    ddpm-evaluate samples=real n=1000 data.root=../shared/data          # the real-vs-real floor alone

Metrics (see :mod:`ddpm_lightning.metrics`): FID in the classifier's feature space against the 10,000 test images,
the floor (the first ``n`` real training images against the test images; a model's FID is read against the floor
at the same ``n``), the Inception Score with the classifier, the class histogram and its normalised entropy, and the
fraction of confidently classified images. Prints a table and writes ``metrics.json`` to ``out_dir``.

The classifier comes from ``classifier_path``: null (the default) is the reference classifier shipped in the package
(:func:`ddpm_lightning.metrics.reference_classifier_path`, sha256 pinned), so every machine measures with the same
weights. Another file (e.g. one retrained with ``ddpm-train-classifier``) that is missing fails with a one-line hint,
unless ``train_classifier_if_missing=true`` trains it there first. Every input is checked before any work starts;
bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning.config import CONFIG_DIR, cli
from ddpm_lightning.data import MNISTDataError, check_mnist_files, load_mnist_split
from ddpm_lightning.errors import ConfigError, flag, invalid, is_int, out_dir_path
from ddpm_lightning.metrics import (
    evaluate_images,
    load_classifier,
    missing_classifier_message,
    reference_classifier_path,
    train_classifier,
)

METRICS_FILE = "metrics.json"
REAL_MODES = ("real", "real-train")
REAL_DEFAULT_N = 10000


def load_samples(path: Path) -> torch.Tensor:
    """``arr_0`` of a samples.npz as uint8 ``(N, 1, 32, 32)``; ConfigError naming ``samples=`` otherwise."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise invalid("samples", str(path), f"holds no arr_0 (arrays: {', '.join(f.files) or 'none'})")
            arr = f["arr_0"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, ConfigError):
            raise
        raise invalid("samples", str(path), f"not a readable .npz file ({type(err).__name__})") from None
    if arr.dtype != np.uint8:
        raise invalid("samples", str(path), f"arr_0 must be uint8 0..255, got {arr.dtype}")
    if arr.ndim == 4 and arr.shape[1:] == (32, 32, 1):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1:] != (1, 32, 32):
        raise invalid("samples", str(path), f"arr_0 must be (N, 32, 32, 1) or (N, 1, 32, 32), got {arr.shape}")
    if arr.shape[0] < 2:
        raise invalid("samples", str(path), f"holds {arr.shape[0]} image(s); FID needs at least 2")
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_labels(path: Path) -> torch.Tensor | None:
    """``arr_1`` of a samples.npz (the requested class of each conditional sample), or None when absent."""
    with np.load(path, allow_pickle=False) as f:
        return torch.from_numpy(f["arr_1"].astype(np.int64)) if "arr_1" in f.files else None


def _validate(cfg: DictConfig, ckpt_must_exist: bool = True) -> dict[str, Any]:
    """Every check that needs neither the classifier nor the images, in the order a user fixes them.
    ``ckpt_must_exist=False``: the checkpoint will be written later (ddpm-train's end-of-run evaluation)."""
    opts: dict[str, Any] = {}
    opts["overwrite"] = flag(cfg, "overwrite")
    opts["train_if_missing"] = flag(cfg, "train_classifier_if_missing")
    opts["inception_fid"] = flag(cfg, "inception_fid")
    samples, ckpt = cfg.get("samples"), cfg.get("ckpt_path")
    if (samples is None) == (ckpt is None):
        raise ConfigError(
            "give exactly one of samples=<samples.npz> (or samples=real) and ckpt_path=<checkpoint>: "
            f"got samples={samples!r}, ckpt_path={ckpt!r}"
        )
    if samples is not None:
        if str(samples) in REAL_MODES:
            opts["mode"] = "real"
        else:
            opts["mode"] = "samples"
            path = Path(str(samples)).expanduser()
            if not path.is_file():
                raise invalid("samples", str(samples), "no such file; give a samples.npz from ddpm-sample, or real")
            opts["samples"] = path.resolve()
    else:
        opts["mode"] = "checkpoint"
        path = Path(str(ckpt)).expanduser()
        if ckpt_must_exist and not path.is_file():
            raise invalid("ckpt_path", str(ckpt), "no such checkpoint file")
        opts["ckpt_path"] = path.resolve()
        num = cfg.get("num_samples")
        if not is_int(num) or num < 2:
            raise invalid("num_samples", num, "must be an integer >= 2 (FID needs at least 2 images)")
    n = cfg.get("n")
    if n is not None and (not is_int(n) or n < 2):
        raise invalid("n", n, "must be null (all images) or an integer >= 2")
    opts["n"] = n
    epochs = cfg.get("classifier_epochs", 3)
    if not is_int(epochs) or epochs < 1:
        raise invalid("classifier_epochs", epochs, "must be a positive integer")
    opts["classifier_epochs"] = epochs
    out_dir = out_dir_path(cfg, "ddpm-evaluate")
    if out_dir.exists() and not out_dir.is_dir():
        raise invalid("out_dir", str(out_dir), "exists and is not a folder")
    if (out_dir / METRICS_FILE).exists() and not opts["overwrite"]:
        raise invalid(
            "out_dir", str(out_dir), f"already holds {METRICS_FILE}; set overwrite=true to replace it, or choose another out_dir"
        )
    opts["out_dir"] = out_dir
    root = cfg.get("data", {}).get("root") if cfg.get("data") is not None else None
    if root is None or str(root) == "":
        raise invalid("data.root", root, "must be the directory containing MNIST/raw (e.g. data.root=../shared/data)")
    check_mnist_files(str(root))  # MNISTDataError: one line naming data.root
    opts["root"] = str(root)
    clf = cfg.get("classifier_path")
    clf_path = Path(str(clf)).expanduser() if clf is not None else reference_classifier_path()
    if clf_path.exists() and not clf_path.is_file():
        raise invalid("classifier_path", str(clf_path), "is a folder, not a classifier file")
    if not clf_path.is_file() and not opts["train_if_missing"]:
        raise ConfigError(missing_classifier_message(clf_path, root=str(root)))
    opts["classifier_path"] = clf_path
    return opts


def _sample_config(cfg: DictConfig, opts: dict[str, Any]) -> DictConfig:
    """conf/sample.yaml's options (without Hydra's keys) with this run's checkpoint, count, sampler and out_dir."""
    base = OmegaConf.load(Path(CONFIG_DIR) / "sample.yaml")
    for key in ("defaults", "hydra", "out_dir", "ckpt_path"):
        if key in base:
            del base[key]  # (pop would resolve ${hydra:...})
    sampler = cfg.get("sampler")
    merged = OmegaConf.merge(
        base,
        {
            "ckpt_path": str(opts["ckpt_path"]),
            "num_samples": cfg.num_samples,
            "batch_size": cfg.get("batch_size", base.batch_size),
            "seed": cfg.get("seed", base.seed),
            "device": cfg.get("device", base.device),
            "use_ema": cfg.get("use_ema", base.use_ema),
            "guidance_scale": cfg.get("guidance_scale", base.guidance_scale),
            "trajectory": False,
            "overwrite": opts["overwrite"],
            "out_dir": str(opts["out_dir"] / "samples"),
        },
    )
    merged.sampler = OmegaConf.to_container(sampler, resolve=True) if sampler is not None else None
    return merged


def train_run_config(train_cfg: Any, ckpt_path: str | Path, out_dir: str | Path) -> DictConfig:
    """The ``conf/evaluate.yaml`` config for ``ddpm-train``'s end-of-run evaluation (the ``evaluate:`` node of
    conf/train.yaml, e.g. ``evaluate: {num_samples: 1000, sampler: {steps: 20}}``): the run's ``data.root``, its
    checkpoint, and ``out_dir`` (one folder per checkpoint step, so nothing is overwritten). The node's keys are
    checked like ``ddpm-evaluate``'s: an unknown key is one line naming ``evaluate.<key>``."""
    base = OmegaConf.load(Path(CONFIG_DIR) / "evaluate.yaml")
    for key in ("defaults", "hydra", "out_dir"):
        del base[key]
    base.sampler = OmegaConf.load(Path(CONFIG_DIR) / "sampler" / "checkpoint.yaml")  # the run's sampler + the node's keys
    node = train_cfg.get("evaluate")
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    allowed = set(base.keys()) - {"samples", "ckpt_path", "data", "task_name"}
    for key in node:
        if key not in allowed:
            raise invalid(f"evaluate.{key}", node[key], f"unknown key; allowed: {sorted(allowed)}")
    cfg = OmegaConf.merge(base, node)
    cfg.samples = None
    cfg.ckpt_path = str(ckpt_path)
    cfg.data.root = str(train_cfg.data.root)
    cfg.out_dir = str(out_dir)
    return cfg


def check_train_run_config(cfg: DictConfig, num_timesteps: int, run_sampler: Any = None) -> None:
    """Check an end-of-run evaluation config before training starts (classifier, counts, sampler steps).
    ``run_sampler``: the training run's ``sampler`` node, which the checkpoint will store."""
    from ddpm_lightning.config import build, sampler_node

    if run_sampler is not None and not isinstance(run_sampler, dict):
        run_sampler = OmegaConf.to_container(run_sampler, resolve=True)
    try:
        _validate(cfg, ckpt_must_exist=False)
        node, _ = sampler_node(cfg.get("sampler"), run_sampler)
        build(node, key="sampler").timesteps(num_timesteps)
    except ConfigError as err:
        raise ConfigError(f"evaluate.{err}") from None


def inception_fid(images: torch.Tensor, real_test: torch.Tensor) -> dict[str, Any]:
    """The standard Inception-v3 FID (torchmetrics + torch-fidelity, 2048-d pool features) against the test images.

    Needs ``pip install torch-fidelity`` and the Inception weights in torch's hub cache (downloaded once with
    internet); without them it is skipped with the reason, never an error. Slow on a CPU (every image is resized
    to 299x299). Returns ``{"inception_fid": float | None, "inception_fid_skipped": str | None}``.
    """
    from ddpm_lightning.metrics import as_model_input

    def rgb_uint8(x: torch.Tensor) -> torch.Tensor:
        return ((as_model_input(x) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)

    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048)
        for i in range(0, real_test.shape[0], 500):
            fid.update(rgb_uint8(real_test[i : i + 500]), real=True)
        for i in range(0, images.shape[0], 500):
            fid.update(rgb_uint8(images[i : i + 500]), real=False)
        return {"inception_fid": float(fid.compute()), "inception_fid_skipped": None}
    except Exception as err:  # noqa: BLE001 - offline / missing package: report and carry on
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
        return {"inception_fid": None, "inception_fid_skipped": reason}


def _format_table(m: dict[str, Any]) -> str:
    hist = " ".join(f"{d}:{c}" for d, c in enumerate(m["class_histogram"]))
    acc = m.get("classifier_test_accuracy")
    sha = m.get("classifier_sha256") or "?"
    which = "the reference" if m.get("classifier_reference") else "a non-reference"
    rows = [
        f"\nEvaluated {m['n']} images ({m['source']}) with {which} classifier {sha[:16]} (test accuracy {acc * 100:.2f}%)"
        if acc is not None else f"\nEvaluated {m['n']} images ({m['source']})",
        *([f"  {'sampler':<34}: {m['sampler']} ({m['sampler_source']})"] if m.get("sampler") else []),
        f"  {'FID vs ' + str(m['n_test']) + ' test images':<34}: {m['fid']:.4f}",
        f"  {'FID floor (' + str(m['floor_n']) + ' train vs test)':<34}: {m['fid_floor']:.4f}",
        f"  {'Inception Score':<34}: {m['inception_score']:.3f}  (real test images: {m['inception_score_test']:.3f})",
        f"  {'class histogram':<34}: {hist}",
        f"  {'normalised class entropy':<34}: {m['normalised_entropy']:.4f}  (1 = uniform)",
        f"  {'confident fraction (p >= 0.9)':<34}: {m['confident_fraction']:.4f}",
        *([f"  {'classified as the requested label':<34}: {m['label_accuracy']:.4f}"] if m.get("label_accuracy") is not None else []),
        f"  {'metrics':<34}: {m['metrics_json']}",
    ]
    if "inception_fid" in m:
        value = f"{m['inception_fid']:.4f}" if m["inception_fid"] is not None else f"skipped ({m['inception_fid_skipped']})"
        rows.insert(-1, f"  {'Inception-v3 FID (standard)':<34}: {value}")
    return "\n".join(rows)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run ``ddpm-evaluate`` on a composed ``conf/evaluate.yaml``; returns the metrics dict (also in metrics.json)."""
    opts = _validate(cfg)
    start = time.perf_counter()
    images, labels = None, None
    if opts["mode"] == "samples":
        images, labels = load_samples(opts["samples"]), load_labels(opts["samples"])
        if opts["n"] is not None and opts["n"] > images.shape[0]:
            raise invalid("n", opts["n"], f"exceeds the {images.shape[0]} images in samples={opts['samples']}")
    clf_path = opts["classifier_path"]
    if not clf_path.is_file():
        print(
            f"classifier {clf_path} not found: training it now on data.root={opts['root']} "
            f"({opts['classifier_epochs']} epochs; train_classifier_if_missing=true) ...",
            flush=True,
        )
        trained = train_classifier(opts["root"], clf_path, epochs=opts["classifier_epochs"])
        print(f"classifier test accuracy {trained['test_accuracy'] * 100:.2f}%, saved to {clf_path}", flush=True)
    classifier, meta = load_classifier(clf_path)
    real_train, _ = load_mnist_split(opts["root"], train=True)
    real_test, _ = load_mnist_split(opts["root"], train=False)

    floor_offset = 0
    sampler_info: dict[str, Any] = {}
    if opts["mode"] == "real":
        n = opts["n"] if opts["n"] is not None else min(REAL_DEFAULT_N, real_train.shape[0])
        if n > real_train.shape[0]:
            raise invalid("n", n, f"exceeds the {real_train.shape[0]} training images under data.root={opts['root']}")
        images = real_train[real_train.shape[0] - n :]  # the last n training images; the floor uses the first n
        source = f"real training images {real_train.shape[0] - n}..{real_train.shape[0] - 1}"
    elif opts["mode"] == "checkpoint":
        from ddpm_lightning.sample import sample  # imports the network code only when sampling

        result = sample(_sample_config(cfg, opts))
        images, labels = load_samples(result["samples"]), load_labels(result["samples"])
        source = f"{result['num_samples']} samples from {opts['ckpt_path']} -> {result['samples']}"
        sampler_info = {"sampler": repr(result["sampler"]), "sampler_source": result["sampler_source"]}
        if opts["n"] is not None and opts["n"] > images.shape[0]:
            raise invalid("n", opts["n"], f"exceeds num_samples={images.shape[0]}")
    else:
        source = str(opts["samples"])
    if opts["n"] is not None:
        images = images[: opts["n"]]
        labels = labels[: opts["n"]] if labels is not None else None

    metrics = evaluate_images(images, classifier, real_test, real_train, meta=meta, floor_offset=floor_offset,
                              labels=labels)
    if opts["inception_fid"]:
        metrics.update(inception_fid(images, real_test))
    out_dir = opts["out_dir"]
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    metrics.update(
        {
            "mode": opts["mode"],
            "source": source,
            "samples": str(opts.get("samples") or (out_dir / "samples" / "samples.npz" if opts["mode"] == "checkpoint" else "real")),
            "ckpt_path": str(opts["ckpt_path"]) if "ckpt_path" in opts else None,
            **sampler_info,
            "classifier_path": str(clf_path),
            "data_root": opts["root"],
            "seconds": time.perf_counter() - start,
            "metrics_json": str(metrics_path),
        }
    )
    tmp = metrics_path.with_name(METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(metrics_path)
    print(_format_table(metrics), flush=True)
    return metrics


@cli(CONFIG_DIR)
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Console entry point. Bad input: one line on stderr and exit status 2, no traceback."""
    try:
        evaluate(cfg)
    except (ConfigError, MNISTDataError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
