"""``ddpm-train-classifier``: train an MNIST classifier with the recipe of the reference classifier that ships in the
package (the default of ``ddpm-evaluate``, ``callbacks.fid`` and the end-of-run evaluation). Its output is another
feature network: select it with ``classifier_path=<file>``; FIDs under it are not comparable with the reference's.

Usage (Hydra-style ``key=value`` arguments, no Hydra run folder)::

    ddpm-train-classifier data.root=../shared/data                    # -> ~/.cache/ddpm_lightning/mnist_classifier.pt
    ddpm-train-classifier data.root=../shared/data out=clf.pt epochs=3 seed=0

Keys: ``data.root`` (dir containing ``MNIST/raw``, default ``data``), ``out`` (default
``$DDPM_LIGHTNING_CACHE/mnist_classifier.pt`` or ``~/.cache/ddpm_lightning/mnist_classifier.pt``), ``epochs`` (3),
``seed`` (0), ``batch_size`` (128), ``lr`` (0.003), ``augment`` (true), ``max_steps`` / ``train_size`` (null; for
quick tests). Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from ddpm_lightning.errors import ConfigError, invalid

USAGE = "usage: ddpm-train-classifier data.root=<dir containing MNIST/raw> [out=<file.pt>] [epochs=3] [seed=0]"

_DEFAULTS: dict[str, Any] = {
    "data.root": "data",
    "out": None,
    "epochs": 3,
    "seed": 0,
    "batch_size": 128,
    "lr": 3e-3,
    "augment": True,
    "max_steps": None,
    "train_size": None,
}


def _parse_value(key: str, text: str) -> Any:
    default = _DEFAULTS[key]
    if text.lower() in ("null", "none", "~"):
        if key in ("out", "max_steps", "train_size"):
            return None
        raise invalid(key, text, "must not be null")
    if key in ("data.root", "out"):
        return text
    if key == "augment":
        if text.lower() not in ("true", "false"):
            raise invalid(key, text, "must be true or false")
        return text.lower() == "true"
    if key == "lr":
        try:
            value = float(text)
        except ValueError:
            raise invalid(key, text, "must be a positive number") from None
        if not value > 0:
            raise invalid(key, text, "must be a positive number")
        return value
    try:  # integers
        return int(text)
    except ValueError:
        raise invalid(key, text, "must be an integer") from None
    return default  # pragma: no cover


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` words -> options (defaults filled in). Raises ConfigError on unknown keys or bad values."""
    opts = dict(_DEFAULTS)
    for word in argv:
        if word in ("-h", "--help"):
            raise SystemExit(print(__doc__) or 0)
        key, sep, value = word.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise ConfigError(f"argument {word!r} is invalid: expected key=value; {USAGE}")
        if key not in _DEFAULTS:
            raise ConfigError(f"{key}={value!r} is invalid: unknown key (allowed: {', '.join(_DEFAULTS)})")
        opts[key] = _parse_value(key, value)
    return opts


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: train, save, print the test accuracy and the weights' sha256."""
    from ddpm_lightning.data import MNISTDataError
    from ddpm_lightning.metrics import REFERENCE_CLASSIFIER_SHA256, train_classifier

    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        print(f"training the MNIST classifier on data.root={opts['data.root']} ...", flush=True)
        result = train_classifier(
            opts["data.root"],
            opts["out"],
            epochs=opts["epochs"],
            seed=opts["seed"],
            batch_size=opts["batch_size"],
            lr=opts["lr"],
            augment=opts["augment"],
            max_steps=opts["max_steps"],
            train_size=opts["train_size"],
        )
    except (ConfigError, MNISTDataError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(
        "\n".join(
            [
                f"classifier saved: {result['path']}",
                f"  test accuracy : {result['test_accuracy'] * 100:.2f}% ({result['test_images']} test images)",
                f"  sha256        : {result['sha256_of_weights']}"
                + (" (the reference classifier's)" if result["sha256_of_weights"] == REFERENCE_CLASSIFIER_SHA256 else
                   f" (the packaged reference is {REFERENCE_CLASSIFIER_SHA256[:16]}...)"),
                f"  trained       : {result['epochs']} epoch(s), {result['steps']} steps on {result['train_images']} "
                f"images, seed {result['seed']}, {result['seconds']:.1f} s",
                f"  use it with   : ddpm-evaluate ... classifier_path={result['path']}",
            ]
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
