"""``ddpm-train-classifier``: train an MNIST classifier with the reference classifier's recipe
(:func:`ddpm_lightning.classifier.train_classifier`), save it and print its test accuracy and weights' sha256.

Usage::

    ddpm-train-classifier data.root=../shared/data                    # -> ~/.cache/ddpm_lightning/mnist_classifier.pt
    ddpm-train-classifier data.root=../shared/data out=clf.pt epochs=3 seed=0

Options: ``conf/train_classifier.yaml``. Use the result with ``classifier_path=<file>``. Bad input: one line on
stderr and exit status 2.

Exit statuses when the file system refuses a path (one line naming the key, e.g. ``out``, and the path, before any
work where it can be known): 4 permission denied, 5 read-only file system, 6 no such folder (or a path under a
regular file), 7 no space left on the device (or disk quota exceeded), 8 any other refusal of the file system.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpm_lightning.config import TrainClassifierConfig, command, options
from ddpm_lightning.filesystem import check_writable_folder


def run(cfg: Any) -> dict[str, Any]:
    from ddpm_lightning.classifier import (  # torch: after the command line is checked
        REFERENCE_CLASSIFIER_SHA256,
        train_classifier,
        trained_classifier_path,
    )

    opts = options(cfg, TrainClassifierConfig, "ddpm-train-classifier")
    out = Path(opts.out).expanduser() if opts.out else trained_classifier_path()
    check_writable_folder("out", opts.out, out.parent)  # before training, the default folder too
    print(f"training the MNIST classifier on data.root={opts.data.root} ...", flush=True)
    result = train_classifier(
        opts.data.root,
        opts.out,
        epochs=opts.epochs,
        seed=opts.seed,
        batch_size=opts.batch_size,
        lr=opts.lr,
        augment=opts.augment,
        max_steps=opts.max_steps,
        train_size=opts.train_size,
    )
    sha = result["sha256_of_weights"]
    print(
        "\n".join(
            [
                f"classifier saved: {result['path']}",
                f"  test accuracy : {result['test_accuracy'] * 100:.2f}% ({result['test_images']} test images)",
                f"  sha256        : {sha}"
                + (
                    " (the reference classifier's)"
                    if sha == REFERENCE_CLASSIFIER_SHA256
                    else f" (the packaged reference is {REFERENCE_CLASSIFIER_SHA256[:16]}...)"
                ),
                f"  trained       : {result['epochs']} epoch(s), {result['steps']} steps "
                f"on {result['train_images']} images, "
                f"seed {result['seed']}, {result['seconds']:.1f} s",
                f"  use it with   : ddpm-evaluate ... classifier_path={result['path']}",
            ]
        ),
        flush=True,
    )
    return result


main = command("train_classifier", files=("out",))(run)

if __name__ == "__main__":
    main()
