"""The classifier-free guidance trade-off (issue #18): one class-conditional checkpoint, the same seeds, 1,000 samples
per guidance scale (labels 0..9 in turn), each scored with the project's classifier: FID, normalised class entropy,
confident fraction and label accuracy (the fraction classified as the requested digit).

Guidance (Ho & Salimans 2022, Eq. 6 with w = s - 1): eps = eps(x_t) + s (eps(x_t, y) - eps(x_t)); s = 1 is the plain
conditional model, s = 0 the unconditional one. Each scale runs ``ddpm-evaluate``'s own code path, so its metrics are
what a user gets from

    ddpm-evaluate ckpt_path=<ckpt> guidance_scale=3 num_samples=1000 data.root=../shared/data

Usage::

    python benchmarks/guidance_curve.py --ckpt <run>/checkpoints/last.ckpt        # scales 1-5, ~1 min each on 2 CPUs
    python benchmarks/guidance_curve.py --ckpt ... --scales 1 3 --num-samples 200   # a quick look

Writes ``benchmarks/results/guidance_curve.json`` and ``docs/images/mnist_cpu_cfg_guidance.png`` (FID and entropy
against the scale, confident fraction and label accuracy beside them), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_rows  # noqa: E402

KEPT = ("fid", "fid_floor", "normalised_entropy", "confident_fraction", "label_accuracy", "inception_score", "seconds")


def run_scale(
    ckpt: str,
    data_root: str,
    scale: float,
    steps: int | None,
    num_samples: int,
    batch_size: int,
    seed: int,
    out_dir: Path,
) -> dict:
    from ddpm_lightning.config import compose_config
    from ddpm_lightning.evaluation import evaluate

    cfg = compose_config(
        "evaluate",
        [
            f"ckpt_path={ckpt}",
            f"guidance_scale={scale}",
            f"num_samples={num_samples}",
            f"batch_size={batch_size}",
            f"seed={seed}",
            f"data.root={data_root}",
            f"out_dir={out_dir}",
            "overwrite=true",
            *([f"sampler.steps={steps}"] if steps else []),
        ],
    )
    start = time.perf_counter()
    metrics = evaluate(cfg)
    return {
        "guidance_scale": scale,
        "sampler": metrics.get("sampler"),
        **{k: metrics.get(k) for k in KEPT},
        "wall_seconds": time.perf_counter() - start,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| guidance scale | FID | entropy | confident | label accuracy | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['guidance_scale']:g} | {r['fid']:.2f} | {r['normalised_entropy']:.4f} | "
            f"{r['confident_fraction']:.3f} | {r['label_accuracy']:.3f} | {r['wall_seconds']:.0f} |"
        )
    floor = rows[0].get("fid_floor") if rows else None
    return "\n".join(lines) + (
        f"\n\nFID floor (real train vs real test, same n): {floor:.2f}" if floor is not None else ""
    )


def plot(rows: list[dict], path: Path, title: str, num_samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["guidance_scale"])
    s = [r["guidance_scale"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    left.plot(s, [r["fid"] for r in rows], marker="o", color="C0", label="classifier FID")
    if rows and rows[0].get("fid_floor") is not None:
        left.axhline(
            rows[0]["fid_floor"], color="C0", linestyle="--", alpha=0.6, label=f"FID floor {rows[0]['fid_floor']:.2f}"
        )
    left.set_xlabel("guidance scale s")
    left.set_ylabel(f"classifier FID ({num_samples:,} samples)", color="C0")
    twin = left.twinx()
    twin.plot(s, [r["normalised_entropy"] for r in rows], marker="s", color="C3", label="class entropy")
    twin.set_ylabel("normalised class entropy", color="C3")
    twin.set_ylim(min(0.9, *(r["normalised_entropy"] - 0.01 for r in rows)), 1.005)
    left.set_ylim(bottom=0)
    left.legend(loc="center left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    left.set_title("FID and entropy")
    right.plot(s, [r["confident_fraction"] for r in rows], marker="o", label="confident fraction (p >= 0.9)")
    right.plot(s, [r["label_accuracy"] for r in rows], marker="s", label="label accuracy")
    right.axhline(0.98, color="grey", linestyle=":", label="targets 0.98 / 0.95")
    right.axhline(0.95, color="grey", linestyle=":")
    right.set_xlabel("guidance scale s")
    lowest = min([0.5, *(r["confident_fraction"] for r in rows), *(r["label_accuracy"] for r in rows)])
    right.set_ylim(max(0.0, lowest - 0.02), 1.0)
    right.legend(fontsize=8, loc="lower right")
    right.set_title("confidence and the requested digit")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="the class-conditional checkpoint (required unless --replot)")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and table from the rows in --out")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's sampler)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guidance_curve.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "images" / "mnist_cpu_cfg_guidance.png"))
    p.add_argument("--title", default="classifier-free guidance, experiment=mnist_cpu_cfg")
    args = p.parse_args()
    if args.replot:
        saved = json.loads(Path(args.out).read_text())
        plot(saved["rows"], Path(args.plot), args.title, saved["num_samples"])
        print(table(saved["rows"]))
        return
    if not args.ckpt:
        p.error("--ckpt is required (or --replot)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            row = run_scale(
                args.ckpt,
                args.data_root,
                scale,
                args.steps,
                args.num_samples,
                args.batch_size,
                args.seed,
                Path(tmp) / f"s{scale:g}",
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_rows(args.out, {"ckpt": args.ckpt, "num_samples": args.num_samples, "seed": args.seed}, rows)
    plot(rows, Path(args.plot), args.title, args.num_samples)
    print(table(rows))


if __name__ == "__main__":
    main()
