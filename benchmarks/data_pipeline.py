"""Data pipeline: the project's MNIST path vs torchvision's per-item PIL path, in images/s, side by side.

* ``project``: ``MNISTDataModule.train_dataloader()`` as ``ddpm-train`` uses it (one uint8 tensor in memory,
  batched gather and conversion to [-1, 1] via ``PaddedMNISTDataset.__getitems__``, seeded shuffle).
* ``project per-item``: the same dataset without ``__getitems__`` (B ``__getitem__`` calls and a stack), to show
  what the batched path buys.
* ``torchvision PIL``: ``torchvision.datasets.MNIST`` with ``Pad(2) + ToTensor() + Normalize(0.5, 0.5)`` through a
  ``DataLoader`` (one PIL image per item), the usual tutorial pipeline. Target: project >= 10x this.

Each loader is iterated for ``--batches`` batches of ``--batch-size``, three rounds interleaved; the median is
reported. All paths produce the same tensors (checked on the first batch of an unshuffled pass).

    python benchmarks/data_pipeline.py --data-root ../shared/data
    python benchmarks/data_pipeline.py --quick --smoke          # seconds (CI; synthetic data if needed)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader
from torchvision import datasets, transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddpm_lightning.data import MNISTDataModule, PaddedMNISTDataset  # noqa: E402

from common import DEFAULT_DATA_ROOT, machine, mnist_root, result_path  # noqa: E402


class PerItem(PaddedMNISTDataset):
    """The project's dataset with the batched ``__getitems__`` switched off."""

    __getitems__ = None  # type: ignore[assignment]


def rate(loader: DataLoader, batches: int) -> float:
    start, n = time.perf_counter(), 0
    for i, (x, _) in enumerate(loader):
        n += x.shape[0]
        if i + 1 == batches:
            break
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100 batches per round")
    parser.add_argument("--smoke", action="store_true", help="5 batches, synthetic data when MNIST is absent (CI)")
    parser.add_argument(
        "--json", default=result_path("data_pipeline.json"), help="where the JSON goes (default: %(default)s)"
    )
    args = parser.parse_args()
    info = machine(args.smoke)
    batches = 5 if args.smoke else (100 if args.quick else args.batches)
    with tempfile.TemporaryDirectory() as tmp:
        root = mnist_root(args.data_root, args.smoke, Path(tmp), n_train=512)
        dm = MNISTDataModule(root=root, batch_size=args.batch_size, val_size=64, num_workers=args.num_workers)
        dm.setup("fit")
        tv = datasets.MNIST(
            root,
            train=True,
            download=False,
            transform=transforms.Compose(
                [transforms.Pad(2), transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]
            ),
        )
        loaders = {
            "project": dm.train_dataloader(),
            "project per-item": DataLoader(
                PerItem(dm.train_images, dm.train_labels),
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=args.num_workers,
            ),
            "torchvision PIL": DataLoader(tv, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers),
        }
        # same values: the first unshuffled batch of each path
        ref = next(iter(DataLoader(tv, batch_size=8)))[0]
        ours = next(iter(DataLoader(PaddedMNISTDataset(dm.train_images, dm.train_labels), batch_size=8)))[0]
        max_abs_diff = float((ref - ours).abs().max())
        rates: dict[str, list[float]] = {k: [] for k in loaders}
        for _ in range(3):
            for name, loader in loaders.items():
                rates[name].append(rate(loader, batches))
    base = statistics.median(rates["torchvision PIL"])
    rows = [
        dict(path=k, images_per_s=statistics.median(v), rounds=v, ratio_vs_pil=statistics.median(v) / base)
        for k, v in rates.items()
    ]
    print(f"{'path':18} {'images/s':>12} {'x PIL':>8}")
    for r in rows:
        print(f"{r['path']:18} {r['images_per_s']:12.0f} {r['ratio_vs_pil']:8.1f}")
    print(f"max |project - torchvision| on the first batch: {max_abs_diff:.2e}")
    out = dict(
        machine=info,
        batch_size=args.batch_size,
        batches=batches,
        num_workers=args.num_workers,
        rows=rows,
        max_abs_diff_vs_torchvision=max_abs_diff,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
