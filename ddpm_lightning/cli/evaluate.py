"""``ddpm-evaluate``: sample quality of a DDPM on MNIST, measured with the reference MNIST classifier.

Usage::

    ddpm-evaluate samples=outputs/samples/<day>/<time>/samples.npz data.root=../shared/data
    ddpm-evaluate ckpt_path=<run>/checkpoints/last.ckpt num_samples=1000 data.root=../shared/data   # its own sampler
    ddpm-evaluate samples=real n=1000 data.root=../shared/data          # the real-vs-real floor alone

Options: ``conf/evaluate.yaml``; what is measured: :mod:`ddpm_lightning.evaluation`. Prints a table and writes
``metrics.json`` to ``out_dir``. Bad input: one line on stderr and exit status 2.
"""

from __future__ import annotations

from typing import Any

from ddpm_lightning.config import command


def run(cfg: Any) -> dict[str, Any]:
    """Evaluate as ``conf/evaluate.yaml`` (with the command line) says; returns the metrics."""
    from ddpm_lightning.evaluation import evaluate  # torch, Lightning: imported after the command line is checked

    return evaluate(cfg)


main = command("evaluate")(run)  # Hydra's job name (evaluate.log) comes from this module

if __name__ == "__main__":
    main()
