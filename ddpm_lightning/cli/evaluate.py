"""``ddpm-evaluate``: sample quality of a DDPM on MNIST, measured with the reference MNIST classifier.

Usage::

    ddpm-evaluate samples=outputs/samples/<day>/<time>/samples.npz data.root=../shared/data
    ddpm-evaluate ckpt_path=<run>/checkpoints/last.ckpt num_samples=1000 data.root=../shared/data   # its own sampler
    ddpm-evaluate samples=real n=1000 data.root=../shared/data          # the real-vs-real floor alone

Options: ``conf/evaluate.yaml``; what is measured: :mod:`ddpm_lightning.evaluation`. Prints a table and writes
``metrics.json`` to ``out_dir``. Bad input: one line on stderr and exit status 2.

Exit statuses when the file system refuses a path (one line naming the key, e.g. ``out_dir``, and the path, before any
work where it can be known): 4 permission denied, 5 read-only file system, 6 no such folder (or a path under a
regular file), 7 no space left on the device (or disk quota exceeded), 8 any other refusal of the file system.
"""

from __future__ import annotations

from typing import Any

from ddpm_lightning.config import command


def run(cfg: Any) -> dict[str, Any]:
    """Evaluate as ``conf/evaluate.yaml`` (with the command line) says; returns the metrics."""
    from ddpm_lightning.evaluation import evaluate  # torch, Lightning: imported after the command line is checked

    return evaluate(cfg)


main = command("evaluate", folders=("out_dir",))(run)  # Hydra's job name (evaluate.log) comes from this module

if __name__ == "__main__":
    main()
